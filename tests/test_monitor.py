"""The reward-hacking monitor: image statistics on hand-made images, the flagging rule on
synthetic metric streams, and a run that stops itself at the flagged epoch."""

import json

import pytest
import torch

from diffrl.monitor import HackingMonitor, image_statistics


def test_image_statistics_by_hand():
    black = torch.zeros(2, 3, 16, 16)
    s = image_statistics(black, ["a", "b"])
    assert s == {"saturation": 0.0, "dark": 1.0, "bright": 0.0, "high_freq": 0.0, "diversity": 0.0}
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    assert image_statistics(red, ["a"])["saturation"] == pytest.approx(1.0)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float().expand(1, 3, 16, 16)
    s = image_statistics(checker, ["a"])  # all energy at the Nyquist corner
    assert s["high_freq"] == pytest.approx(1.0) and s["bright"] == s["dark"] == pytest.approx(0.5)
    ramp = torch.linspace(0, 1, 16)[None, :].expand(16, 16).expand(1, 3, 16, 16)
    assert image_statistics(ramp, ["a"])["high_freq"] < 0.1  # a smooth image: low frequencies
    same = torch.rand(1, 3, 16, 16).expand(3, 3, 16, 16)
    varied = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert image_statistics(same, ["p"] * 3)["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert image_statistics(varied, ["p"] * 3)["diversity"] > 0.5


def _stream(rewards, saturation):
    return [
        {"epoch": i, "reward_mean": r, "reward_std": 0.1, "image_saturation": s, "image_dark": 0.2}
        for i, (r, s) in enumerate(zip(rewards, saturation))
    ]


def _flags(records, **kwargs):
    monitor = HackingMonitor(baseline_epochs=3, window=2, reward_rise=0.5, tolerance=0.1, **kwargs)
    return [bool(monitor.update(r)) for r in records]


def test_flagged_only_when_the_reward_rises_while_a_statistic_drifts():
    rising = [0.5, 0.5, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9]
    drifting = [0.3, 0.3, 0.3, 0.3, 0.35, 0.45, 0.5, 0.6]
    # the window's means: reward +1.0 std at epoch 4 (0.575), saturation 0.3 -> 0.40 at epoch 5
    assert _flags(_stream(rising, drifting)) == [False] * 5 + [True] * 3
    assert not any(_flags(_stream([0.5] * 8, drifting)))  # images drift, reward flat: not hacking
    assert not any(_flags(_stream(rising, [0.3] * 8)))  # reward rises, images stable: learning
    monitor = HackingMonitor(3, 2, 0.5, 0.1)
    reasons = [monitor.update(r) for r in _stream(rising, drifting)][-1]
    assert reasons[0].startswith("reward +") and reasons[1] == "saturation 0.300 -> 0.550"


def test_a_resumed_monitor_keeps_its_baseline():
    records = _stream([0.5, 0.5, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9], [0.3, 0.3, 0.3, 0.3, 0.35, 0.45, 0.5, 0.6])
    whole = _flags(records)
    resumed = HackingMonitor(3, 2, 0.5, 0.1, history=records[:4])
    assert [bool(resumed.update(r)) for r in records[4:]] == whole[4:]


def test_a_run_logs_the_statistics_and_stops_at_the_flagged_epoch(tmp_path, monkeypatch):
    """A reward that rises every call (a counter) with any image change tolerated as drift
    (tolerance 0): the monitor flags the first epoch after its one-epoch baseline, and
    ``monitor.stop`` ends the run there with a checkpoint instead of running all 5 epochs."""
    from tests.test_trainer import _run

    (tmp_path / "counter.py").write_text(
        "import torch\n"
        "def make(start=0):\n"
        "    calls = [start]\n"
        "    def reward(images, prompts, metadata):\n"
        "        calls[0] += 1\n"
        "        return torch.full((len(prompts),), float(calls[0])) + torch.arange(len(prompts)) * 0.01\n"
        "    return reward\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [
        "reward.name=counter:make",
        "reward.kwargs={start: 0}",
        "run.num_epochs=5",
        "run.save_freq=10",
    ]
    overrides += ["monitor.baseline_epochs=1", "monitor.window=1", "monitor.tolerance=0", "monitor.stop=true"]
    _run(tmp_path, "hack", *overrides)
    from diffrl.files import read_jsonl

    records = read_jsonl(tmp_path / "hack" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1] and [r["hacking"] for r in records] == [0, 1]
    assert records[1]["hacking_reasons"].startswith("reward +")
    assert all(0 <= r["image_saturation"] <= 1 and 0 <= r["image_diversity"] <= 1 for r in records)
    assert (tmp_path / "hack" / "checkpoints" / "epoch_0001").is_dir()
    page = (tmp_path / "hack" / "report.html").read_text()
    assert "<li>epoch 1: reward +" in page and 'data-metric="image saturation"' in page


def test_an_evaluation_reward_falling_flags_while_the_reward_rises():
    records = _stream([0.5, 0.5, 0.5, 0.6, 0.7, 0.8, 0.9], [0.3] * 7)  # statistics stable
    records[0]["eval_clip"], records[3]["eval_clip"], records[5]["eval_clip"] = 30.0, 28.0, 26.0
    monitor = HackingMonitor(3, 2, 0.5, 0.1)
    reasons = [monitor.update(r) for r in records]
    assert [bool(r) for r in reasons] == [False] * 5 + [True] * 2  # 28 is within 10% of 30; 26 is not
    assert reasons[5][1] == reasons[6][1] == "eval_clip 30 -> 26"  # the latest evaluation holds


def test_a_run_reports_evaluation_rewards_on_fixed_prompts_and_seeds(tmp_path):
    """``eval.rewards`` before the training of epoch 0 (the pretrained model), of every
    ``eval.every``-th epoch and after the last: the same images as sampling the fixed prompts from
    the fixed seed with those weights, scored by hand."""
    from diffrl import rewards
    from diffrl.evaluation import load_for_eval
    from diffrl.files import read_jsonl
    from diffrl.rollout import sample_trajectories
    from diffrl.types import SamplerSettings
    from tests.test_trainer import _run

    evals = "eval.rewards=[{name: jpeg_compressibility, label: jpeg}, {name: shapes_alignment}]"
    overrides = [evals, "eval.prompts=toy_heldout_single", "eval.every=2", "eval.num_images=6", "eval.eta=0"]
    _run(tmp_path, "ev", "run.num_epochs=3", "model.pretrained=tiny", *overrides)
    records = read_jsonl(tmp_path / "ev" / "metrics.jsonl")
    assert [sorted(k for k in r if k.startswith("eval_")) for r in records] == [
        ["eval_jpeg", "eval_shapes_alignment"], [], ["eval_jpeg", "eval_shapes_alignment"]
    ]  # fmt: skip
    assert [r.get("evaluation_after_epochs") for r in records] == [0, None, 3]
    from diffrl.pipelines import load_pipeline
    from diffrl.prompts import load_prompts

    prompts = load_prompts("toy_heldout_single").prompts[:6]
    settings = SamplerSettings(num_steps=4, guidance_scale=5.0, eta=0.0)
    for record, pipe in (
        (records[0], load_pipeline("tiny")),
        (records[-1], load_for_eval(str(tmp_path / "ev"))[0]),
    ):
        traj = sample_trajectories(pipe, prompts, settings, generator=torch.Generator().manual_seed(0))
        for key, name in (
            ("eval_shapes_alignment", "shapes_alignment"),
            ("eval_jpeg", "jpeg_compressibility"),
        ):
            want = rewards.get(name)(traj.images, prompts).mean().item()
            assert record[key] == pytest.approx(want, abs=1e-4)  # JPEG sizes move with any weight change


def test_a_run_scores_a_geneval_suite_as_diffrl_eval_does(tmp_path):
    """``eval.suite``: before epoch 0 and after the last, the per-task accuracies and Overall that
    ``diffrl eval --suite toy-geneval`` prints for the pretrained model and for the exported run,
    to the digit (the same rows, images per row, seed and sampler)."""
    from diffrl.cli import main
    from diffrl.files import read_jsonl
    from tests.test_trainer import _run

    suite = ["eval.suite=toy-geneval", "eval.images_per_prompt=1", "eval.num_steps=4", "eval.eta=0"]
    big_steps = ["train.learning_rate=0.05", "train.clip_range=1"]  # weights that score differently
    _run(tmp_path, "gen", "run.num_epochs=2", "model.pretrained=tiny", "eval.every=5", *big_steps, *suite)
    records = read_jsonl(tmp_path / "gen" / "metrics.jsonl")
    assert records[-1]["eval_geneval"] != records[0]["eval_geneval"]  # so scoring the base would fail below
    flags = ["--suite", "toy-geneval", "--images-per-prompt", "1", "--num-steps", "4", "--eta", "0"]
    for record, model in ((records[0], "tiny"), (records[-1], str(tmp_path / "gen"))):
        out = tmp_path / f"{len(model)}.json"
        assert main(["eval", model, *flags, "--guidance-scale", "5", "--json", str(out)]) == 0
        table = json.loads(out.read_text())[model]
        assert record["eval_geneval"] == table.pop("overall")["accuracy"]
        tasks = {k: v["accuracy"] for k, v in table.items() if isinstance(v, dict)}
        assert {k[len("geneval_") :]: v for k, v in record.items() if k.startswith("geneval_")} == tasks
        assert len(tasks) == 6
    assert [r.get("evaluation_after_epochs") for r in records] == [0, 2]


def test_bad_evaluation_rewards_are_refused_before_any_model_loads(tmp_path, monkeypatch):
    from diffrl import trainer
    from diffrl.cli import resolve_train_config
    from diffrl.errors import InputFileError, RewardError
    from tests.test_trainer import TINY

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer, "build_learner", no_model)
    bad = ["eval.rewards=[{name: no_such_reward}]", f"run.output_dir={tmp_path}"]
    with pytest.raises(RewardError, match="unknown reward 'no_such_reward'"):
        trainer.train(resolve_train_config(TINY, bad, None))
    missing = [f"eval.suite={tmp_path / 'none.jsonl'}", f"run.output_dir={tmp_path}"]
    with pytest.raises(InputFileError, match="none.jsonl: no such GenEval prompt file"):
        trainer.train(resolve_train_config(TINY, missing, None))
