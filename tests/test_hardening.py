"""Hardening (issue #20): every bad input of the config and the CLI is one line before any model
loads; a run folder belongs to one run; damaged checkpoints are skipped; metrics stay strict JSON;
rewards cannot corrupt what is saved; progress lines without a TTY."""

import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

import diffrl.evaluation as evaluation_module
import diffrl.learner as learner_module
import diffrl.progress as progress_module
from diffrl import rewards
from diffrl.checkpoints import resolve_resume, verify
from diffrl.cli import main, resolve_train_config
from diffrl.config import load_config
from diffrl.configfile import load_yaml
from diffrl.errors import ConfigError, InputFileError, RewardError
from diffrl.files import json_line, read_jsonl
from diffrl.stat_tracking import PerPromptStatTracker
from diffrl.trainer import train

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "ddpo" / "tiny_compressibility.yaml")
FAST = ["sample.num_steps=2", "sample.batch_size=2", "sample.num_batches_per_epoch=1", "train.batch_size=2"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(learner_module, "load_pipeline", no_loading)
    monkeypatch.setattr(evaluation_module, "load_for_eval", no_loading)


def _files(tmp: Path) -> None:
    (tmp / "a_file.txt").write_text("x")
    (tmp / "dup.yaml").write_text("train:\n  learning_rate: 1e-4\n  batch_size: 2\n  learning_rate: 3e-4\n")
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(6)]
    (tmp / "bomb.yaml").write_text("\n".join(bomb) + "\n")


TRAIN = "train " + TINY + " " + " ".join(FAST) + " run.output_dir={tmp}/runs "
BAD = [
    # config values, in range and finite
    (TRAIN + "run.name=../escape", "run.name: '../escape' is not a single folder name"),
    (TRAIN + "run.name=a/b", "run.name: 'a/b' is not a single folder name"),
    (TRAIN + "run.name=" + "n" * 200, "is not a single folder name"),
    (TRAIN + "run.seed=-1", "run.seed: must be in [0, 2**32), got -1"),
    (TRAIN + "run.seed=99999999999999999999", "run.seed: must be in [0, 2**32)"),
    (TRAIN + "sample.eta=2", "sample.eta: must be in [0, 1]"),
    (TRAIN + "sample.guidance_scale=-1", "sample.guidance_scale: must be in [0, 100]"),
    (TRAIN + "sample.guidance_scale=.nan", "sample.guidance_scale: must be a finite number"),
    (TRAIN + "train.learning_rate=1e3", "train.learning_rate: must be <= 1"),
    (TRAIN + "model.lora_rank=0", "model.lora_rank: must be in [1, 4096]"),
    (TRAIN + "model.lora_alpha=0", "model.lora_alpha: must be > 0"),
    (TRAIN + "sample.resolution=99999", "sample.resolution: must be in [1, 8192] pixels"),
    (
        TRAIN + "reward.name=shapes_alignment sample.resolution=16",
        "sample.resolution: 16-pixel images are smaller than the 32 pixels reward shapes_alignment needs",
    ),
    (
        TRAIN + 'reward.kwargs={{"qualty":50}}',
        "reward.kwargs: reward 'jpeg_compressibility' does not take ['qualty']",
    ),
    (
        TRAIN + "sample.batch_size=40000000",
        "sample.batch_size: an epoch of 40000000 x 1 trajectories of 2 steps at 32 pixels stores",
    ),
    (
        "train " + TINY + " run.output_dir={tmp}/a_file.txt/runs",
        "run.output_dir: {tmp}/a_file.txt/runs cannot be a folder: {tmp}/a_file.txt is a file",
    ),
    (
        "train {tmp}/dup.yaml",
        "dup.yaml line 4: invalid YAML (duplicate key 'learning_rate' on lines 2 and 4)",
    ),
    ("train {tmp}/bomb.yaml", "bomb.yaml line 1: invalid YAML (aliases expand it to"),
    ("train " + TINY + " {tmp}/dup.yaml", "diffrl train takes one CONFIG file"),
    ("train " + TINY + " --resume {tmp}/nowhere", "nowhere: not a run folder"),
    ("train --new-name --resume {tmp}/nowhere x.y=1", "--new-name starts a new run; it cannot be combined"),
    # the other commands' arguments
    (
        "eval tiny-sd --prompts simple_animals --reward jpeg_compressibility --num-steps 0",
        "argument --num-steps: must be in [1, 1000], got 0",
    ),
    (
        "eval tiny-sd --prompts simple_animals --reward jpeg_compressibility --num-images -3",
        "argument --num-images: must be in [1, inf), got -3",
    ),
    (
        "eval tiny-sd --prompts simple_animals --reward jpeg_compressibility --eta nan",
        "argument --eta: must be in [0, 1], got nan",
    ),
    (
        "eval tiny-sd --prompts simple_animals --reward jpeg_compressibility --json {tmp}",
        "--json: {tmp} is a folder",
    ),
    (
        "eval tiny-sd {tmp}/no-model --prompts simple_animals --reward jpeg_compressibility",
        "no-model: not a diffusers pipeline folder",  # found before tiny-sd loads
    ),
    ("sample {tmp}/no-model", "no-model: not a diffusers pipeline folder"),
    ("eval tiny-sd", "diffrl eval needs --prompts and --reward (or --suite toy-geneval|FILE.jsonl)"),
    ("eval tiny-sd --suite {tmp}/missing.jsonl", "missing.jsonl: no such GenEval prompt file"),
    ("eval tiny-sd --suite {tmp}/dup.yaml", "dup.yaml:1: Expecting value"),
    ("sample tiny-sd --M 0", "argument --M: must be in [1, inf), got 0"),
    ("sample tiny-sd --M many", "argument --M: expected an integer, got 'many'"),
    ("sample tiny-sd --alpha -1", "argument --alpha: must be in [0, inf), got -1"),
    ("sample tiny-sd --alpha inf", "argument --alpha: must be in [0, inf), got inf"),
    ("sample tiny-sd --resample-fraction 1", "argument --resample-fraction: must be in [0, 1), got 1"),
    ("sample tiny-sd --num-steps 5000", "argument --num-steps: must be in [1, 1000], got 5000"),
    ("sample tiny-sd --guidance-scale -2", "argument --guidance-scale: must be in [0, 100], got -2"),
    ("sample tiny-sd --seed -5", "argument --seed: must be in [0, 4294967296), got -5"),
    ("sample tiny-sd --out {tmp}/a_file.txt/out", "--out: {tmp}/a_file.txt/out cannot be a folder"),
    ("sample tiny-sd --reward jpeg --guidance best-of-n", "unknown reward 'jpeg'"),
    ("sample tiny-sd --num-images 0", "argument --num-images: must be in [1, inf), got 0"),
    (
        "train-value tiny-sd --prompts simple_animals --reward jpeg_compressibility --out {tmp}",
        "--out: {tmp} is a folder",
    ),
    (
        "train-value tiny-sd --prompts simple_animals --reward jpeg_compressibility --epochs 0",
        "argument --epochs: must be in [1, inf)",
    ),
    ("label {tmp} --port 70000", "argument --port: must be in [0, 65535], got 70000"),
    ("label {tmp} --port http", "argument --port: expected an integer, got 'http'"),
    ("sample tiny-sd --no-such-flag", "unrecognized arguments: --no-such-flag"),
]


def _status(args: list[str]) -> int:
    """``diffrl ARGS``'s exit status (argparse's errors exit through SystemExit)."""
    try:
        return main(args)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("command, message", BAD, ids=[f"{i}-{c.split()[0]}" for i, (c, _) in enumerate(BAD)])
def test_bad_input_is_one_line_with_status_2_before_any_model_loads(
    command, message, tmp_path, no_model_loads, capsys
):
    _files(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _status(command.format(tmp=tmp_path).split()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and "Traceback" not in err, err
    assert message.format(tmp=tmp_path) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing is written before the checks pass"


def test_a_port_in_use_is_one_line(tmp_path, capsys):
    from diffrl import human
    from tests.test_human import fake_rollouts

    fake_rollouts(human.rollout_folder(tmp_path, 0, 0))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["label", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}: cannot listen there" in err, err


def test_a_non_loopback_address_warns_and_the_url_carries_the_token(tmp_path, monkeypatch, capsys):
    from http.server import ThreadingHTTPServer

    from diffrl import human
    from tests.test_human import fake_rollouts

    fake_rollouts(human.rollout_folder(tmp_path, 0, 0))

    def serve_once(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ThreadingHTTPServer, "serve_forever", serve_once)
    assert main(["label", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 0
    out = capsys.readouterr()
    assert "WARNING: listening on 0.0.0.0" in out.err
    assert "/?token=" in out.out and len(out.out.split("token=")[1].split()[0]) >= 20


def test_unknown_reward_keywords_are_named_before_the_reward_is_built():
    with pytest.raises(RewardError, match=r"does not take \['size'\].*it takes: quality"):
        rewards.get("jpeg_compressibility", size=3)
    assert rewards.get("jpeg_compressibility", quality=50).min_size == 1


# ---------------------------------------------------------------------------- YAML


def test_duplicate_keys_name_both_lines_and_alias_bombs_are_refused(tmp_path):
    with pytest.raises(Exception, match=r"duplicate key 'a' on lines 1 and 3"):
        load_yaml("a: 1\nb: 2\na: 3\n")
    with pytest.raises(Exception, match=r"duplicate key 'x' on lines 2 and 3"):
        load_yaml("s:\n  x: 1\n  x: 2\n")
    assert load_yaml("a: &v [1, 2]\nb: *v\n") == {"a": [1, 2], "b": [1, 2]}  # aliases themselves are fine
    _files(tmp_path)
    with pytest.raises(
        ConfigError, match=r"bomb.yaml line 1: invalid YAML \(aliases expand it to [\d,]{10} values"
    ):
        load_config(tmp_path / "bomb.yaml")  # counted on the node graph, never expanded


# ---------------------------------------------------------------------------- a run folder belongs to one run


def _train(tmp_path, *overrides, resume=None, new_name=False):
    args = [*FAST, f"run.output_dir={tmp_path}", "run.name=r", *overrides]
    return train(resolve_train_config(TINY, args, resume, new_name=new_name))


def test_a_used_run_name_is_refused_then_new_name_and_overwrite_start_cleanly(tmp_path, capsys):
    _train(tmp_path, "run.num_epochs=2", "run.keep_last=1")
    first = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    config_text = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(
        ConfigError, match=r"run.name: .*/r already holds a run; continue it with: diffrl train --resume"
    ):
        _train(tmp_path, "run.num_epochs=1")
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl") == first  # untouched
    assert (tmp_path / "r" / "config.yaml").read_text() == config_text

    _train(tmp_path, "run.num_epochs=1", new_name=True)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r-2" / "metrics.jsonl")] == [0]
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl") == first

    _train(tmp_path, "run.num_epochs=1", "run.overwrite=true")
    assert [r["epoch"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")] == [0]  # the new run only
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["epoch_0000"]


def test_resume_refuses_changes_of_model_algorithm_or_shapes_and_records_what_it_allows(tmp_path, capsys):
    _train(tmp_path, "run.num_epochs=1")
    capsys.readouterr()
    run = tmp_path / "r"
    config_text = (run / "config.yaml").read_text()
    for change, key in [
        ("model.lora_rank=8", "model.lora_rank"),
        ("algorithm=tests.plugins.reinforce", "algorithm"),
        ("sample.batch_size=4", "sample.batch_size"),
        ("reward.name=jpeg_incompressibility", "reward.name"),
    ]:
        assert main(["train", "--resume", str(run), change]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: {key}: the run being resumed has" in err, err
    # overrides before and after the options; the change is recorded, config.yaml is kept
    assert main(["train", "run.num_epochs=3", "--resume", str(run), "train.learning_rate=1e-4"]) == 0
    assert (run / "config.yaml").read_text() == config_text
    (record,) = read_jsonl(run / "resumes.jsonl")
    assert record["set"] == {"run.num_epochs": 3, "train.learning_rate": 1e-4}
    assert record["was"] == {"run.num_epochs": 1, "train.learning_rate": 3e-4} and record["start_epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]
    # a later resume continues with the recorded changes (num_epochs 3 is done: nothing to run)
    config = resolve_train_config(None, [], str(run))
    assert (config.run.num_epochs, config.train.learning_rate) == (3, 1e-4)


# ---------------------------------------------------------------------------- damaged checkpoints


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    _train(tmp, "run.num_epochs=2", "run.keep_last=2")
    return tmp / "r"


@pytest.mark.parametrize(
    "name, how",
    [
        ("trainable.safetensors", "flip"),
        ("optimizer.pt", "truncate"),
        ("state.json", "flip"),
        ("rng_rank0.pt", "delete"),
        ("manifest.json", "truncate"),
    ],
)
def test_a_damaged_checkpoint_is_skipped_for_the_older_one(two_checkpoints, tmp_path, capsys, name, how):
    run = tmp_path / "r"
    shutil.copytree(two_checkpoints, run)
    _damage(run / "checkpoints" / "epoch_0001" / name, how)
    assert verify(run / "checkpoints" / "epoch_0001") is not None
    assert resolve_resume(run, report=True)[1].name == "epoch_0000"
    err = capsys.readouterr().err
    assert f"skipping {run / 'checkpoints' / 'epoch_0001'}: " in err and (name in err or "manifest" in err), (
        err
    )
    # naming the damaged checkpoint itself is a one-line error
    assert main(["train", "--resume", str(run / "checkpoints" / "epoch_0001")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a complete checkpoint" in err, err


def test_resume_falls_back_to_the_older_checkpoint_and_retrains_the_epoch(two_checkpoints, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(two_checkpoints, run)
    reference = read_jsonl(run / "metrics.jsonl")
    _damage(run / "checkpoints" / "epoch_0001" / "optimizer.pt", "flip")
    train(resolve_train_config(None, [], str(run)))
    redone = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in redone] == [0, 1]
    assert redone[1]["reward_mean"] == pytest.approx(
        reference[1]["reward_mean"], abs=1e-6
    )  # the same epoch 1
    assert verify(run / "checkpoints" / "epoch_0001") is None  # rewritten whole


def test_every_checkpoint_damaged_is_an_error_naming_each(two_checkpoints, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(two_checkpoints, run)
    for epoch in (0, 1):
        _damage(run / "checkpoints" / f"epoch_000{epoch}" / "trainable.safetensors", "truncate")
    with pytest.raises(
        InputFileError, match=r"no checkpoint verifies \(epoch_0001: trainable.safetensors has \d+ bytes"
    ):
        resolve_resume(run)


def test_a_corrupt_file_of_an_unverified_checkpoint_is_one_line(two_checkpoints, tmp_path, capsys):
    """A checkpoint from before manifests is not hashed; its damaged file still fails with one line."""
    run = tmp_path / "r"
    shutil.copytree(two_checkpoints, run)
    for folder in (run / "checkpoints").iterdir():
        (folder / "manifest.json").unlink()
    (run / "checkpoints" / "epoch_0001" / "trainable.safetensors").write_bytes(b"not safetensors")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainable.safetensors: cannot be read as safetensors weights" in err, err


# ---------------------------------------------------------------------------- metrics and rewards


def test_metric_lines_are_strict_json():
    line = json_line({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": 2})
    assert json.loads(line) == {
        "a": None,
        "b": [1.0, None],
        "c": {"d": None},
        "e": 2,
        "nonfinite": ["a", "b[1]", "c.d"],
    }
    assert "NaN" not in line and "Infinity" not in line


def VANDAL(images, prompts, metadata):  # noqa: N802 - a reward named by its import path below
    """Zeroes its input and returns rewards near float32's largest value."""
    images.zero_()
    return torch.tensor([3e38, 3.3e38, -3e38, 2.7e38])


def test_a_reward_cannot_modify_the_images_or_overflow_the_statistics():
    images = torch.rand(4, 3, 8, 8)
    kept = images.clone()
    values = rewards.get("tests.test_hardening:VANDAL")(images, ["p"] * 4, None)
    assert torch.equal(images, kept), "the reward got a copy"
    advantages = PerPromptStatTracker(16, 16).update(["p"] * 4, values)  # float32 sums would overflow
    expected = (values.double() - values.double().mean()) / values.double().std(unbiased=False)
    assert torch.isfinite(advantages).all()
    torch.testing.assert_close(advantages.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RewardError, match=r"beyond float32's range .* indices \[1\]"):
        rewards.check_rewards("big", torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64), 3)


# ---------------------------------------------------------------------------- progress without a TTY


def test_progress_without_a_tty_announces_long_phases_and_beats_during_them(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "_LONG", {})
    monkeypatch.setattr(progress_module, "FIRST_LINE", 0.1)
    monkeypatch.setattr(progress_module, "HEARTBEAT", 0.05)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    for _ in progress_module.progress(range(3), "epoch 2/5: sampling", True):
        time.sleep(0.2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "epoch 2/5: sampling, 0/3 batches, 0s", lines  # the first sampling: announced
    assert all(line.startswith("epoch 2/5: sampling, ") for line in lines) and len(lines) >= 4, lines
    assert lines[-1].split(", ")[1] in ("2/3 batches", "3/3 batches"), lines
    list(progress_module.progress(range(3), "epoch 3/5: sampling", True))  # after a long one: announced
    assert capsys.readouterr().err == "epoch 3/5: sampling, 0/3 batches, 0s\n"
    list(progress_module.progress(range(3), "epoch 4/5: sampling", True))  # after a short one: silent
    assert capsys.readouterr().err == ""


def test_a_run_without_a_tty_says_where_it_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "_LONG", {})
    _train(tmp_path, "run.num_epochs=2")
    out, err = capsys.readouterr()
    assert (
        "diffrl: loading tiny-sd" in out and "diffrl: sampling the fixed-seed grid samples/before.png" in err
    )
    assert "epoch 1/2: sampling, 0/1 batches" in err and "epoch 1/2: training, 0/1 minibatches" in err, err
    assert "epoch 2/2: sampling" not in err, "fast phases are announced once"
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert epoch_lines[0].startswith("epoch 1/2: reward ") and ", ETA " in epoch_lines[0]
    assert epoch_lines[1].startswith("epoch 2/2: reward ") and epoch_lines[1].endswith(", done")
