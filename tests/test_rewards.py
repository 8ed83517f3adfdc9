import io
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from diffrl import rewards
from diffrl.rewards import RewardError
from diffrl.rewards.clip import AestheticMLP, clip_preprocess

TINY_CLIP = "diffrl-tiny-clip-test"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random open_clip model registered from a small JSON config (no download)."""
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY_CLIP}.json"
    path.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(TINY_CLIP, pretrained=None).eval()


def _grid_images(batch=3, size=32, seed=0):
    """Float images whose values are exact uint8 levels, so PIL and torch paths see equal pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255


def test_jpeg_size_matches_pil_and_sign():
    images = _grid_images()
    expected = []
    for img in images:
        array = (img * 255).round().byte().permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    expected = torch.tensor(expected)
    torch.testing.assert_close(rewards.get("jpeg_incompressibility")(images, ["x"] * 3), expected)
    torch.testing.assert_close(rewards.get("jpeg_compressibility")(images, ["x"] * 3), -expected)
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert rewards.get("jpeg_compressibility")(flat, ["x"])[0] > -expected.min()


def test_clip_preprocess_matches_open_clip_pil_transform(tiny_clip):
    transform = open_clip.image_transform(
        32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    images = _grid_images()
    expected = torch.stack(
        [transform(Image.fromarray((i * 255).byte().permute(1, 2, 0).numpy())) for i in images]
    )
    torch.testing.assert_close(clip_preprocess(images, tiny_clip), expected, rtol=1e-5, atol=1e-5)
    # non-square, larger input: short side resized to 32, centre crop; PIL's and torch's bicubic differ slightly
    smooth = F.interpolate(_grid_images(2, 8, seed=1), size=(48, 64), mode="bilinear")
    smooth = (smooth * 255).round() / 255
    expected = torch.stack(
        [transform(Image.fromarray((i * 255).byte().permute(1, 2, 0).numpy())) for i in smooth]
    )
    ours = clip_preprocess(smooth, tiny_clip)
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    assert (ours - expected).abs().mean() < 0.03


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_arithmetic(tiny_clip, tmp_path, suffix):
    torch.manual_seed(1)
    head = AestheticMLP(16)
    path = tmp_path / f"head{suffix}"
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))

    images = _grid_images()
    reward = rewards.get("aesthetic", weights=str(path), clip=tiny_clip)
    with torch.no_grad():
        emb = tiny_clip.encode_image(clip_preprocess(images, tiny_clip))
    x = emb / emb.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # the five Linear layers, no activations in between
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(reward(images, ["x"] * 3), x.squeeze(-1), rtol=1e-5, atol=1e-5)


def test_clip_score_arithmetic(tiny_clip):
    prompts = ["a red circle", "a photo of a dog", "an astronaut"]
    images = _grid_images()
    reward = rewards.get("clip_score", clip_model=TINY_CLIP, clip=tiny_clip)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        img = tiny_clip.encode_image(clip_preprocess(images, tiny_clip))
        txt = tiny_clip.encode_text(tokenizer(prompts))
    cos = (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))
    expected = torch.where(cos > 0, 100 * cos, torch.zeros_like(cos))
    torch.testing.assert_close(reward(images, prompts), expected, rtol=1e-5, atol=1e-4)


def test_offline_missing_weights_say_which_file():
    with pytest.raises(FileNotFoundError, match="aesthetic-model.pth.*local path"):
        rewards.get("aesthetic", weights="no-such-org/no-such-repo")


def test_offline_missing_clip_weights_say_what_to_pass(tiny_clip, tmp_path):
    head = tmp_path / "head.pth"
    torch.save(AestheticMLP(16).state_dict(), head)
    with pytest.raises(FileNotFoundError, match="local open_clip checkpoint"):
        rewards.get(
            "aesthetic", weights=str(head), clip_model=TINY_CLIP, clip_pretrained=str(tmp_path / "nope.bin")
        )


def test_custom_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def brightness(images, prompts, metadata):\n"
        "    return images.mean(dim=(1, 2, 3))\n"
        "def scaled(factor):\n"
        "    return lambda images, prompts, metadata: factor * images.mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = _grid_images()
    torch.testing.assert_close(
        rewards.get("my_rewards:brightness")(images, ["x"] * 3), images.mean(dim=(1, 2, 3))
    )
    torch.testing.assert_close(
        rewards.get("my_rewards:scaled", factor=2.0)(images, ["x"] * 3), 2 * images.mean(dim=(1, 2, 3))
    )
    with pytest.raises(ValueError, match="cannot import 'nope'"):
        rewards.get("my_rewards:nope")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.get("nope")


@pytest.mark.parametrize(
    "output, message",
    [
        (lambda b: torch.zeros(b, 1), r"shape \(3, 1\), expected \(3,\)"),
        (lambda b: np.zeros(b), "returned ndarray"),
        (
            lambda b: torch.tensor([0.0, float("nan"), float("inf")]),
            r"non-finite values at sample indices \[1, 2\]",
        ),
    ],
)
def test_bad_reward_output_names_the_reward(tmp_path, monkeypatch, output, message):
    monkeypatch.setitem(
        rewards.REGISTRY, "broken", lambda: lambda images, prompts, metadata: output(len(prompts))
    )
    with pytest.raises(RewardError, match=f"reward 'broken'.*{message}"):
        rewards.get("broken")(_grid_images(), ["x"] * 3)
