"""scripts/compare.py's tables and claim verdicts on synthetic runs, against the numbers by hand."""

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import compare  # noqa: E402

TASKS = compare.CATEGORIES


def heldout(overall: float) -> dict:
    return {**dict.fromkeys(TASKS, overall), "overall": overall, "partial_credit": overall}


def run(method, setting, seed, overall, model="tiny", guidance=5.0, steps=20, **costs):
    return {
        "method": method, "setting": setting, "seed": seed, "model": model, "guidance": guidance,
        "eval_steps": steps, "heldout": heldout(overall), "queries": 1280, "wall_seconds": 100.0,
        "rows_per_query": 10.0, "peak_memory_mb": 900.0, "epochs": 40, "M": 4, **costs,
    }  # fmt: skip


def bases() -> dict:
    keys = [("tiny", 20, 5.0), ("tiny-lcm", 4, 5.0), ("tiny-flow", 20, 5.0), ("tiny-flow", 20, 1.0)]
    return {compare.base_key(*k): {"heldout": heldout(0.5)} for k in keys}


def synthetic() -> list[dict]:
    """Three seeds of every run a claim reads: DDPO gains 0.10, D3PO 0.09, B² on the sparse reward
    0.20 against DDPO's 0.05, RLCM as good as DDPO in a third of the time, NFT no better than
    GRPO, SVDD-PM clearly above best-of-N."""
    out = []
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        out += [
            run("DDPO", "budget", seed, 0.60 + noise),
            run("D3PO", "budget", seed, 0.59 + noise),
            run("DDPO, strict reward", "budget", seed, 0.55 + noise),
            run("B²-DiffuRL, strict reward", "budget", seed, 0.70 + noise),
            run("RLCM", "budget", seed, 0.60 + noise, model="tiny-lcm", steps=4, wall_seconds=30.0),
            run("Flow-GRPO", "budget", seed, 0.52 + noise, model="tiny-flow", wall_seconds=100.0),
            run("Flow-GRPO, 20 training steps", "budget", seed, 0.53 + noise, model="tiny-flow", wall_seconds=250.0),
            run("DiffusionNFT", "budget", seed, 0.52 + 3 * noise, model="tiny-flow", guidance=1.0),
            {"method": "SVDD-PM", "setting": "smooth", "seed": seed, "reward": -1.00 + noise, "M": 4},
            {"method": "best-of-N", "setting": "smooth", "seed": seed, "reward": -1.10 + noise, "M": 4},
            {"method": "plain", "setting": "smooth", "seed": seed, "reward": -1.20 + noise, "M": 4},
        ]  # fmt: skip
    return out


def test_difference_and_verdicts_by_hand():
    d = compare.difference((0.5, 0.03), (0.4, 0.04))
    assert d == pytest.approx((0.1, 0.05))
    assert compare.verdict((0.11, 0.05)) == "holds"  # more than 2 standard errors
    assert compare.verdict((0.09, 0.05)) == "does not hold here (within noise)"
    assert compare.verdict((-0.2, 0.05)) == "does not hold here (reversed)"
    assert compare.verdict((0.05, 0.05), "equal") == "holds"
    assert compare.verdict((0.2, 0.05), "equal") == "does not hold here"


def test_each_claim_reads_its_runs():
    runs = synthetic()
    overopt = {
        "results": {
            "single proxy": [{"epochs": [0, 30], "verifier": [0.9, v]} for v in (0.35, 0.37, 0.39)],
            "single proxy + KL": [{"epochs": [0, 30], "verifier": [0.9, v]} for v in (0.88, 0.89, 0.90)],
            "WCO ensemble": [{"epochs": [0, 30], "verifier": [0.9, v]} for v in (0.40, 0.42, 0.44)],
            "UWO ensemble": [{"epochs": [0, 30], "verifier": [0.9, v]} for v in (0.41, 0.42, 0.43)],
        }
    }
    got = {c["claim"]: c for c in compare.claims(runs, bases(), overopt)}
    se = statistics.stdev([-0.01, 0.0, 0.01]) / 3**0.5
    svdd = got["SVDD-PM beats best-of-N at equal compute on a smooth reward"]
    assert svdd["verdict"] == "holds" and f"{0.100:+.3f} ± {se * 2**0.5:.3f}" in svdd["measurement"]
    assert got["B²-DiffuRL beats DDPO on sparse rewards"]["verdict"] == "holds"
    assert got["RLCM reaches DDPO's reward with far less compute"]["verdict"] == "holds"  # 30 s vs 100 s
    assert got["D3PO ≈ DDPO without a reward model"]["verdict"] == "holds"  # 0.09 vs 0.10 gain
    assert got["Flow-GRPO's denoising reduction costs no final reward"]["verdict"] == "holds"
    nft = got["DiffusionNFT is more sample-efficient than Flow-GRPO"]
    assert nft["verdict"] == "does not hold here (within noise)"
    ensembles = got["Reward-model ensembles (WCO, UWO) reduce over-optimisation"]
    assert "best ensemble − single +0.050" in ensembles["measurement"]  # WCO 0.42 vs single 0.37
    assert "after 30 GRPO epochs" in ensembles["measurement"]
    assert ensembles["verdict"] == "holds"


def test_the_table_gives_mean_and_standard_error_over_seeds():
    runs = [run("DDPO", "budget", s, v) for s, v in enumerate((0.60, 0.62, 0.67))]
    rows, text = compare.table(runs, bases(), "budget", "t")
    overall = rows[0]["heldout"]["overall"]
    assert overall == pytest.approx((0.63, statistics.stdev([0.60, 0.62, 0.67]) / 3**0.5))
    assert "| tiny | DDPO | 0.630 ± 0.021 |" in text


def test_the_tables_replace_only_the_marked_block_of_a_page(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(f"intro\n{compare.BEGIN}\nold table\n{compare.END}\noutro\n")
    compare.update_readme(page, "new table\n")
    assert page.read_text() == f"intro\n{compare.BEGIN}\nnew table\n{compare.END}\noutro\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="bare.md has no"):
        compare.update_readme(tmp_path / "bare.md", "x")


def test_a_claim_against_a_baseline_that_gains_nothing_is_not_testable():
    """DDPO at its base: "RLCM reaches DDPO's reward" and "D3PO ≈ DDPO" cannot be tested."""
    runs = [
        {**r, "heldout": heldout(0.5 + (r["heldout"]["overall"] - 0.6))} if r["method"] == "DDPO" else r
        for r in synthetic()
    ]
    got = {c["claim"]: c["verdict"] for c in compare.claims(runs, bases(), None)}
    because = "not testable here: DDPO does not raise the held-out score at this budget"
    assert got["RLCM reaches DDPO's reward with far less compute"] == because
    assert got["D3PO ≈ DDPO without a reward model"] == because
    assert got["B²-DiffuRL beats DDPO on sparse rewards"] == "holds"  # its own strict-reward runs
    assert "Reward-model ensembles (WCO, UWO) reduce over-optimisation" not in got  # no overopt.json


def test_overopt_is_read_from_a_file_or_a_finished_folder_and_run_into_an_empty_one(tmp_path, monkeypatch):
    """``--overopt``: a ``.json`` is read as it is; a folder holding ``overopt.json`` is read
    without rerunning; an empty folder gets ``overoptimisation.py --out folder`` run into it first."""
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        (out / "overopt.json").write_text('{"results": {"ran": 1}}')

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    given = tmp_path / "mine.json"
    given.write_text('{"results": {"given": 1}}')
    assert compare.load_overopt(given) == {"results": {"given": 1}}
    folder = tmp_path / "overopt"
    folder.mkdir()
    assert compare.load_overopt(folder) == {"results": {"ran": 1}}
    assert len(calls) == 1 and calls[0][1].endswith("overoptimisation.py")
    (folder / "overopt.json").write_text('{"results": {"earlier": 1}}')
    assert compare.load_overopt(folder) == {"results": {"earlier": 1}}
    assert len(calls) == 1  # the finished folder was not rerun
