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


@pytest.mark.parametrize(
    "name, kwargs, what",
    [
        (
            "pickscore",
            {"processor": "no-such-org/clip-processor"},
            "PickScore processor 'no-such-org/clip-processor'",
        ),
        ("hpsv2", {"weights": "no-such-org/hps"}, "HPS_v2.1_compressed.pt.*local path"),
        (
            "imagereward",
            {"tokenizer": "no-such-org/bert"},
            "'vocab.txt' from the hub repo 'no-such-org/bert'",
        ),
        ("geneval", {"suite": None}, "needs suite="),
    ],
)
def test_offline_model_rewards_name_what_is_missing(name, kwargs, what, tmp_path):
    with pytest.raises((FileNotFoundError, RewardError), match=what):
        rewards.get(name, **kwargs)


def test_offline_geneval_detector_names_the_model(tmp_path):
    from diffrl import geneval, toyworld

    geneval.write_suite(tmp_path / "s.jsonl", [toyworld.geneval_row("a photo of a blue circle")])
    with pytest.raises(FileNotFoundError, match="OWLv2 processor 'no-such-org/owl'.*local folder"):
        rewards.get("geneval", suite=str(tmp_path / "s.jsonl"), detector="no-such-org/owl")


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


def _pil(images: torch.Tensor) -> list:
    return [Image.fromarray((i * 255).round().byte().permute(1, 2, 0).numpy()) for i in images]


def _smooth_images(shape=(48, 64)) -> torch.Tensor:
    """Non-square images on exact uint8 levels, smooth enough that PIL's and torch's bicubic agree
    to a few levels (sharp edges would be the filters' differences, not the transform's)."""
    smooth = F.interpolate(_grid_images(2, 8, seed=1), size=shape, mode="bilinear")
    return (smooth * 255).round() / 255


def _clip_family_configs():
    """The character-level CLIP tokenizer and one-layer text / vision tower settings (width 16,
    32 px, patch 8) that the tiny CLIP and OWLv2 models below share."""
    from diffrl.testing import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    vocab = len(tokenizer)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = dict(tower, vocab_size=vocab, max_position_embeddings=77)
    text.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return tokenizer, text, dict(tower, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def tiny_pickscore():
    """A random transformers ``CLIPModel`` and a ``CLIPProcessor`` on the PIL backend, the
    image processor PickScore was released with (at 32 px instead of 224)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer, text, vision = _clip_family_configs()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def test_pickscore_preprocessing_is_its_processors_pil_path(tiny_pickscore):
    import math

    from diffrl.rewards.clip import resize_crop_normalize
    from diffrl.rewards.pickscore import image_settings

    _, processor = tiny_pickscore
    settings = image_settings(processor.image_processor)
    assert settings[:2] == (32, 32)
    images = _grid_images()
    expected = processor.image_processor(_pil(images), return_tensors="pt").pixel_values
    torch.testing.assert_close(
        resize_crop_normalize(images, *settings, offset=math.floor), expected, rtol=0, atol=1e-5
    )
    smooth = _smooth_images((48, 71))  # short side 32, long 47: an odd 15-pixel crop margin, floored
    expected = processor.image_processor(_pil(smooth), return_tensors="pt").pixel_values
    ours = resize_crop_normalize(smooth, *settings, offset=math.floor)
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    assert (ours - expected).abs().mean() < 0.03
    shifted = resize_crop_normalize(smooth, *settings, offset=math.ceil)
    assert (shifted - expected).abs().mean() > (ours - expected).abs().mean()


def test_pickscore_is_the_scaled_clip_logit(tiny_pickscore):
    """s = exp(logit_scale) · cos(projected image, projected text), then (s − offset) / scale."""
    model, processor = tiny_pickscore
    prompts = ["a red circle", "a photo of a dog", "an astronaut riding a horse"]
    images = _grid_images()
    reward = rewards.get(
        "pickscore", offset=18.0, scale=8.0, clip=model, clip_processor=processor, device="cpu"
    )
    pixels = processor.image_processor(_pil(images), return_tensors="pt").pixel_values
    tokens = processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    cos = F.cosine_similarity(image, text, dim=-1)
    expected = (model.logit_scale.exp() * cos - 18.0) / 8.0
    torch.testing.assert_close(reward(images, prompts, [{}] * 3), expected, rtol=1e-4, atol=1e-4)


def test_hps_preprocessing_is_open_clips_longest_side_transform():
    from diffrl.rewards.hps import longest_side_preprocess

    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transform = open_clip.image_transform(32, is_train=False, mean=mean, std=std, resize_mode="longest")
    images = _grid_images()
    expected = torch.stack([transform(p) for p in _pil(images)])
    torch.testing.assert_close(longest_side_preprocess(images, 32, mean, std), expected, rtol=0, atol=1e-5)
    smooth = _smooth_images((40, 64))  # longest side to 32: 20 x 32, padded by 6 rows above and below
    expected = torch.stack([transform(p) for p in _pil(smooth)])
    ours = longest_side_preprocess(smooth, 32, mean, std)
    black = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
    for rows in (slice(0, 6), slice(26, 32)):
        torch.testing.assert_close(ours[:, :, rows], black.expand(2, 3, 6, 32))
        torch.testing.assert_close(expected[:, :, rows], black.expand(2, 3, 6, 32))
    assert (ours - expected)[:, :, 6:26].abs().mean() < 0.03


def test_hpsv2_is_the_cosine_of_its_checkpoints_features(tiny_clip, tmp_path):
    """The checkpoint in HPSv2's ``{"state_dict": ...}`` layout is loaded into the architecture and
    the score is the plain cosine of image and text features (no logit scale)."""
    from diffrl.rewards.hps import longest_side_preprocess

    torch.manual_seed(3)
    tuned = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    torch.save({"state_dict": tuned.state_dict()}, tmp_path / "hps.pt")
    reward = rewards.get("hpsv2", weights=str(tmp_path / "hps.pt"), clip_model=TINY_CLIP, device="cpu")
    prompts = ["a red circle", "a photo of a dog", "an astronaut"]
    images = _grid_images()
    cfg = tuned.visual.preprocess_cfg
    with torch.no_grad():
        img = tuned.encode_image(longest_side_preprocess(images, 32, cfg["mean"], cfg["std"]))
        txt = tuned.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    expected = F.cosine_similarity(img, txt, dim=-1)
    got = reward(images, prompts, [{}] * 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    untuned = rewards.get("hpsv2", clip_model=TINY_CLIP, clip=tiny_clip, device="cpu")(
        images, prompts, [{}] * 3
    )
    assert (got - untuned).abs().max() > 1e-3  # the checkpoint's weights were used


@pytest.fixture(scope="module")
def tiny_owl():
    """A random ``Owlv2ForObjectDetection`` and its processor at 32 px (nothing downloaded)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer, text, vision = _clip_family_configs()
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=vision, projection_dim=16)
    ).eval()
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    return model, processor


def test_owlv2_detections_are_its_processors_post_processing(tiny_owl, tiny_pickscore):
    """Boxes of an image padded to a square at the bottom and right, scaled to the square's side,
    each classed by its best query, as the processor's own post-processing gives them; each
    detection's colour is CLIP's zero-shot choice over GenEval's ten colours on its crop."""
    from diffrl.rewards.clip import resize_crop_normalize
    from diffrl.rewards.geneval_detector import COLORS, owlv2_detector, pixel_box
    from diffrl.rewards.pickscore import image_settings

    owl, owl_processor = tiny_owl
    clip, clip_processor = tiny_pickscore
    detect = owlv2_detector(
        owl=owl,
        owl_processor=owl_processor,
        clip=clip,
        clip_processor=clip_processor,
        device="cpu",
        min_score=0.0,
    )
    image = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(0))
    classes = ["circle", "square"]
    found = detect(image, classes, with_colour=False)
    inputs = owl_processor(
        text=[[f"a photo of a {c}" for c in classes]], images=[image], do_rescale=False, return_tensors="pt"
    )
    with torch.no_grad():
        want = owl_processor.post_process_grounded_object_detection(
            owl(**inputs), threshold=0.0, target_sizes=[(40, 40)]
        )[0]
    assert len(found) == len(want["scores"]) == 16  # one per patch, in the patches' order
    assert [d.cls for d in found] == [classes[i] for i in want["labels"].tolist()]
    torch.testing.assert_close(torch.tensor([d.score for d in found]), want["scores"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor([d.box for d in found]), want["boxes"], rtol=1e-5, atol=1e-4)

    coloured = detect(image, classes)[0]
    x0, y0, x1, y1 = pixel_box(coloured.box, 24, 40)
    assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 24
    crop = resize_crop_normalize(
        image[None, :, y0:y1, x0:x1], *image_settings(clip_processor.image_processor)
    )
    tokens = clip_processor.tokenizer(
        [f"a photo of a {c} {coloured.cls}" for c in COLORS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        img = clip.visual_projection(clip.vision_model(pixel_values=crop).pooler_output)
        txt = clip.text_projection(clip.text_model(**tokens).pooler_output)
    assert coloured.color == COLORS[F.cosine_similarity(img, txt, dim=-1).argmax().item()]


def test_the_geneval_reward_applies_genevals_rule_to_the_detections(tmp_path):
    from diffrl import geneval
    from diffrl.geneval import Detection

    rows = [
        {"tag": "counting", "prompt": "a photo of three cats", "include": [{"class": "cat", "count": 3}],
         "exclude": [{"class": "cat", "count": 4}]},
        {"tag": "color_attr", "prompt": "a photo of a red cup and a blue dog",
         "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}]},
    ]  # fmt: skip
    geneval.write_suite(tmp_path / "suite.jsonl", rows)
    cat = lambda score: Detection("cat", score, (0, 0, 4, 4))  # noqa: E731
    scene = {
        "a photo of three cats": [cat(0.95), cat(0.92), cat(0.5)],  # the third is below counting's 0.9
        "a photo of a red cup and a blue dog": [Detection("cup", 0.8, (0, 0, 4, 4), "red"), Detection("dog", 0.6, (5, 5, 9, 9), "brown")],
    }  # fmt: skip
    asked = []

    def detect(image, classes, with_colour):
        prompt = "a photo of three cats" if classes == ["cat"] else "a photo of a red cup and a blue dog"
        asked.append((classes, with_colour))
        return scene[prompt]

    reward = rewards.get("geneval", suite=str(tmp_path / "suite.jsonl"), detect=detect)
    metadata = [{}, {}, {}]
    prompts = [rows[0]["prompt"], rows[1]["prompt"], rows[0]["prompt"]]
    values = reward(torch.zeros(3, 3, 8, 8), prompts, metadata)
    # counting: 2 of 3 found -> 1 - 1/3; attribution: cup 1 + red 1 + dog 1 + blue 0 over 4 items
    torch.testing.assert_close(values, torch.tensor([2 / 3, 3 / 4, 2 / 3]))
    assert [m["geneval_correct"] for m in metadata] == [0.0, 0.0, 0.0]
    assert asked[:2] == [(["cat"], False), (["cup", "dog"], True)]
    scene["a photo of three cats"] = [cat(0.95)] * 3
    assert (
        reward(torch.zeros(1, 3, 8, 8), prompts[:1], metadata[:1]).item() == 1.0
        and metadata[0]["geneval_correct"] == 1.0
    )
    scene["a photo of three cats"] = [cat(0.95)] * 4  # the exclude rule: four is not three
    reward(torch.zeros(1, 3, 8, 8), prompts[:1], metadata[:1])
    assert metadata[0]["geneval_correct"] == 0.0
    with pytest.raises(RewardError, match="'a photo of a dog' is not a row"):
        reward(torch.zeros(1, 3, 8, 8), ["a photo of a dog"], [{}])
    with pytest.raises(RewardError, match="needs suite="):
        rewards.get("geneval", detect=detect)


def _blip_vit_forward(state: dict, pixels: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """BLIP's ViT (a pre-norm ViT, Dosovitskiy et al. 2021 Eq. 1-4; LayerNorm eps 1e-6) written
    out on a state dict in BLIP's own names: ``[B, 3, S, S] -> [B, 1 + patches, D]``."""
    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    batch, dim = x.shape[0], x.shape[-1]
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x], dim=1) + state["pos_embed"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        w = {k[len(f"blocks.{i}.") :]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (dim,), w["norm1.weight"], w["norm1.bias"], eps=1e-6)
        q, k, v = (
            F.linear(h, w["attn.qkv.weight"], w["attn.qkv.bias"])
            .reshape(batch, -1, 3, heads, dim // heads)
            .permute(2, 0, 3, 1, 4)
        )
        attention = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1)
        x = x + F.linear(
            (attention @ v).transpose(1, 2).reshape(batch, -1, dim),
            w["attn.proj.weight"],
            w["attn.proj.bias"],
        )
        h = F.layer_norm(x, (dim,), w["norm2.weight"], w["norm2.bias"], eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"])),
            w["mlp.fc2.weight"],
            w["mlp.fc2.bias"],
        )
    return F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)


def test_imagereward_converts_blips_checkpoint_and_scores_as_the_authors(tmp_path):
    """A random checkpoint in BLIP's layout (ViT in BLIP's names, BERT, the MLP head, and modules
    the score does not use) loads strictly; the score is (MLP(BERT_[CLS](c | ViT(x))) − μ) / σ with
    the ViT written out by hand, and the image goes through the authors' torchvision transform."""
    from torchvision import transforms
    from transformers import BertTokenizer, BlipTextModel

    from diffrl.rewards.clip import resize_crop_normalize
    from diffrl.rewards.imagereward import (
        CLIP_MEAN,
        CLIP_STD,
        MEAN,
        STD,
        blip_configs,
        convert_checkpoint,
        load_image_reward,
    )

    words = "a red circle to the left of green square photo dog".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    med = dict(vocab_size=len(tokenizer) + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=40, layer_norm_eps=1e-12)  # fmt: skip
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    size, patch, width, heads = 32, 8, 128, 2  # BLIP's ViTs have 64-dimensional heads
    torch.manual_seed(0)
    vit = {"cls_token": torch.randn(1, 1, width), "pos_embed": torch.randn(1, 17, width) * 0.1,
           "patch_embed.proj.weight": torch.randn(width, 3, patch, patch) * 0.1,
           "patch_embed.proj.bias": torch.randn(width) * 0.1,
           "norm.weight": 1 + 0.1 * torch.randn(width), "norm.bias": 0.1 * torch.randn(width)}  # fmt: skip
    for i in range(2):
        for name, shape in [("norm1", (width,)), ("norm2", (width,)), ("attn.qkv", (3 * width, width)),
                            ("attn.proj", (width, width)), ("mlp.fc1", (2 * width, width)), ("mlp.fc2", (width, 2 * width))]:  # fmt: skip
            vit[f"blocks.{i}.{name}.weight"] = torch.randn(shape) * (0.3 if len(shape) == 2 else 0.1) + (
                len(shape) == 1
            )
            vit[f"blocks.{i}.{name}.bias"] = torch.randn(shape[0]) * 0.1
    _, text_config = blip_configs(
        med, convert_checkpoint({f"blip.visual_encoder.{k}": v for k, v in vit.items()})["vision"]
    )
    text = BlipTextModel(text_config, add_pooling_layer=False).eval()
    mlp = AestheticMLP(16).eval()
    for module in (text, mlp):  # weights large enough that the score depends on its inputs
        for p in module.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=1.5 / p.shape[1] ** 0.5)
    checkpoint = {f"blip.visual_encoder.{k}": v for k, v in vit.items()}
    checkpoint |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    checkpoint |= {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    checkpoint |= {"blip.text_encoder.embeddings.position_ids": torch.arange(40)[None],
                   "blip.vision_proj.weight": torch.randn(8, width)}  # fmt: skip
    torch.save(checkpoint, tmp_path / "ImageReward.pt")

    reward = rewards.get("imagereward", weights=str(tmp_path), bert_tokenizer=tokenizer, device="cpu")

    reference = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])  # fmt: skip
    smooth = _smooth_images((48, 41))  # short side to 32: a 7-pixel crop margin, rounded as torchvision does
    ours = resize_crop_normalize(smooth, size, size, CLIP_MEAN, CLIP_STD)
    assert (ours - torch.stack([reference(p) for p in _pil(smooth)])).abs().mean() < 0.03

    images = _grid_images(2, size)  # at the model's side the transform is exact: the score formula to 1e-4
    prompts = ["a red circle", "a photo of a dog to the left of a green square"]
    pixels = torch.stack([reference(p) for p in _pil(images)])
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert ids.input_ids.shape == (2, 35)
    with torch.no_grad():
        tokens = _blip_vit_forward(vit, pixels, heads, patch)
        cls = text(input_ids=ids.input_ids, attention_mask=ids.attention_mask, encoder_hidden_states=tokens,
                   encoder_attention_mask=torch.ones(tokens.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]  # fmt: skip
        expected = (mlp(cls).squeeze(-1) - MEAN) / STD
    assert expected.std() > 0.05  # the two prompts and images must be told apart
    torch.testing.assert_close(reward(images, prompts, [{}] * 2), expected, rtol=0, atol=1e-4)

    del checkpoint["blip.visual_encoder.norm.bias"]
    torch.save(checkpoint, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="vision encoder does not match.*post_layernorm.bias"):
        load_image_reward(str(tmp_path), "ImageReward.pt", "med_config.json")
