"""Learned proxy rewards: fitted on noisy verifier labels they track the verifier on held-out
scenes, members disagree, the ensemble file round-trips, and the ensemble objectives take them."""

import pytest
import torch

from diffrl import rewards, toyworld
from diffrl.errors import RewardError
from diffrl.prompts import load_prompts
from diffrl.rewards.proxy import fit_member, load_ensemble, save_ensemble, word_ids


def _scenes(count: int, seed: int):
    """Renders of toy prompts, half of them captioned with another prompt (a wrong scene), with
    the verifier's scores: (images [N, 3, 32, 32], prompts, scores)."""
    pool = load_prompts("toy_train_single").prompts
    g = torch.Generator().manual_seed(seed)
    drawn = [pool[i] for i in torch.randint(len(pool), (count,), generator=g).tolist()]
    shown = [
        p if i % 2 else pool[j]
        for i, (p, j) in enumerate(zip(drawn, torch.randint(len(pool), (count,), generator=g).tolist()))
    ]
    images = toyworld.render_batch(shown, seed=seed)
    return images, drawn, rewards.get("shapes_alignment")(images, drawn)


def test_word_ids_are_stable_hashes():
    ids, offsets = word_ids(["a red circle", "A RED"], 256)
    assert offsets.tolist() == [0, 3] and ids[:2].tolist() == ids[3:].tolist()
    assert ids.max() < 256


def test_proxies_fitted_on_noisy_labels_track_the_verifier_and_round_trip(tmp_path):
    images, prompts, gold = _scenes(384, seed=0)
    noisy = gold + 0.1 * torch.randn(384, generator=torch.Generator().manual_seed(1))
    members = [fit_member(images, prompts, noisy, seed=k, steps=300) for k in range(2)]
    test_images, test_prompts, test_gold = _scenes(128, seed=5)
    with torch.no_grad():
        scores = torch.stack([m(test_images, test_prompts) for m in members])
    centred = test_gold - test_gold.mean()
    for s in scores:
        s = s - s.mean()
        assert (s * centred).sum() / (s.norm() * centred.norm()) > 0.5  # tracks the verifier
    assert (scores[0] - scores[1]).abs().mean() > 1e-3  # bootstrap members differ

    path = tmp_path / "proxy.safetensors"
    save_ensemble(path, members, {"noise": 0.1})
    loaded, meta = load_ensemble(path)
    assert meta["members"] == 2 and meta["noise"] == 0.1
    mean = rewards.get("proxy", weights=str(path))(test_images, test_prompts)
    torch.testing.assert_close(mean, scores.mean(0), rtol=1e-5, atol=1e-6)
    first = rewards.get("proxy", weights=str(path), member=0)(test_images, test_prompts)
    torch.testing.assert_close(first, scores[0], rtol=1e-5, atol=1e-6)
    wco = rewards.get(
        "ensemble",
        rewards=[
            {"name": "proxy", "kwargs": {"weights": str(path), "member": k}, "label": f"p{k}"}
            for k in range(2)
        ],
        objective="wco",
    )(test_images, test_prompts)
    torch.testing.assert_close(wco, scores.min(0).values, rtol=1e-5, atol=1e-6)
    with pytest.raises(RewardError, match="member 2 of .* holds 2"):
        rewards.get("proxy", weights=str(path), member=2)


def test_overoptimisation_summary_and_chart_from_synthetic_curves(tmp_path):
    """The experiment's table: start/end means ± standard deviations over seeds and the verifier's
    change, by hand; its chart draws each arm in its own colour."""
    from PIL import Image

    from diffrl.files import CHART_COLOURS
    from scripts.overoptimisation import markdown, plot, summarize

    runs = {
        "single proxy": [
            {"epochs": [0, 5, 10], "verifier": [0.9, 0.6, 0.2], "proxy": [0.9, 1.1, 1.3], "first_flag": 4},
            {"epochs": [0, 5, 10], "verifier": [0.9, 0.7, 0.4], "proxy": [0.9, 1.0, 1.1], "first_flag": None},
        ],
        "WCO ensemble": [
            {
                "epochs": [0, 5, 10],
                "verifier": [0.9, 0.9, 0.8],
                "proxy": [0.9, 0.95, 1.0],
                "first_flag": None,
            },
            {"epochs": [0, 5, 10], "verifier": [0.9, 0.9, 0.9], "proxy": [0.9, 0.9, 0.9], "first_flag": None},
        ],
    }
    single, wco = summarize(runs)
    assert single["verifier_end"][0] == pytest.approx(0.3) and single["verifier_end"][1] == pytest.approx(
        2**0.5 * 0.1
    )
    assert single["proxy_end"][0] == pytest.approx(1.2) and single["first_flags"] == [4, None]
    assert wco["verifier_change"][0] == pytest.approx(-0.05)
    table = markdown([single, wco], seeds=2, epochs=11)
    assert (
        "| single proxy | 0.900 ± 0.000 → 1.200 ± 0.141 | 0.900 ± 0.000 → 0.300 ± 0.141 | -0.600 ± 0.141 | 4, — |"
        in table
    )
    plot(runs, tmp_path / "p.png")
    pixels = set(Image.open(tmp_path / "p.png").convert("RGB").getdata())
    for colour in CHART_COLOURS[:2]:
        from PIL import ImageColor

        assert ImageColor.getrgb(colour) in pixels


@pytest.mark.slow
def test_a_single_proxy_is_over_optimised_while_kl_keeps_the_verifier(tmp_path):
    """The toy over-optimisation experiment, small (``scripts/overoptimisation.py``: one seed, the
    single-proxy and KL arms, 25 epochs; the proxy is the experiment's member 0, fitted on the same
    512 noisy labels): against the proxy GRPO raises it and lowers the exact verifier, and the
    monitor flags the run; with the KL penalty the verifier ends clearly higher."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proxy = tmp_path / "proxy.safetensors"
    subprocess.run(
        [sys.executable, root / "scripts/train_proxy_rewards.py", "--out", proxy, "--members", "1"],
        check=True,
    )
    arms = ["--arms", "single proxy", "single proxy + KL", "--seeds", "1", "--epochs", "25", "--members", "1"]
    command = [
        sys.executable,
        root / "scripts/overoptimisation.py",
        "--out",
        tmp_path,
        "--proxy",
        proxy,
        *arms,
    ]
    subprocess.run([*command, "--set", "eval.every=8", "eval.num_images=32"], check=True)
    single, kl = json.loads((tmp_path / "overopt.json").read_text())["summary"]
    assert single["proxy_end"][0] > single["proxy_start"][0]  # the proxy is optimised ...
    assert single["verifier_end"][0] < single["verifier_start"][0] - 0.15  # ... and the verifier falls
    assert single["first_flags"][0] is not None
    assert kl["verifier_end"][0] > single["verifier_end"][0] + 0.15
