"""Reliability: crash safety (SIGKILL at several points, SIGTERM), numerical faults, reward
faults, bad input caught before any model loads, and untrusted files."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import diffrl.algorithms.ddpo as ddpo_module
import diffrl.learner as learner_module
import diffrl.trainer as trainer_module
from diffrl import rewards
from diffrl.algorithms.ddpo import ppo_loss
from diffrl.cli import main, resolve_train_config
from diffrl.config import load_config
from diffrl.errors import InputFileError, NumericalError, PipelineNotFoundError, RewardError
from diffrl.files import read_jsonl
from diffrl.guards import check_log_ratios
from diffrl.learner import step_log_prob, step_output
from diffrl.rollout import sample_trajectories
from diffrl.trainer import train
from diffrl.types import SamplerSettings

HERE = Path(__file__).parent
ROOT = HERE.parent
TINY = str(ROOT / "configs" / "ddpo" / "tiny_compressibility.yaml")
FAST = ["sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4"]


def _config(tmp_path, name, *overrides, resume=None):
    args = [*FAST, f"run.output_dir={tmp_path}", f"run.name={name}", *overrides]
    return resolve_train_config(TINY, args, resume)


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    return [
        {k: v for k, v in r.items() if not k.startswith("time_")} for r in read_jsonl(run / "metrics.jsonl")
    ]


def _weights(run: Path, epoch: int, name: str = "trainable") -> dict:
    return load_file(str(run / "checkpoints" / f"epoch_{epoch:04d}" / f"{name}.safetensors"))


# ---------------------------------------------------------------------------- reward faults


def _images(n=4):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _checked(fn, name):
    """``fn`` with the registry's output checks, as :func:`diffrl.rewards.get` returns it."""

    def checked(images, prompts, metadata):
        return rewards.check_rewards(name, fn(images, prompts, metadata), images.shape[0])

    checked.__name__ = name
    return checked


def _raises(images, prompts, metadata):
    raise ValueError("scorer offline")


def _sleeps(images, prompts, metadata):
    time.sleep(5)
    return images.mean(dim=(1, 2, 3))


def _nan_at_1_and_3(images, prompts, metadata):
    values = images.mean(dim=(1, 2, 3))
    values[1], values[3] = float("nan"), float("inf")
    return values


@pytest.mark.parametrize(
    "fn, message",
    [
        (
            _raises,
            r"reward 'probe' raised ValueError: scorer offline on sample indices \[8, 9, 10, 11\] \(epoch 2\)",
        ),
        (
            _sleeps,
            r"reward 'probe' timed out TimeoutError: no result after 0.2s on sample indices \[8, 9, 10, 11\]",
        ),
        (
            _nan_at_1_and_3,
            r"reward 'probe' returned non-finite values on sample indices \[9, 11\] \(epoch 2\)",
        ),
        (lambda i, p, m: i.mean(dim=(1, 2, 3))[:3], r"returned shape \(3,\), expected \(4,\)"),
        (lambda i, p, m: [0.0] * 4, r"returned list, expected a torch.Tensor of shape \[4\]"),
        (lambda i, p, m: torch.ones(4, dtype=torch.bool), r"returned dtype torch.bool"),
    ],
)
def test_reward_faults_name_the_reward_and_samples(fn, message):
    images = _images()
    with pytest.raises(RewardError, match=message):
        rewards.score(
            _checked(fn, "probe"), images, ["p"] * 4, [{}] * 4, timeout=0.2, first_index=8, where="epoch 2"
        )
    with pytest.warns(RuntimeWarning, match="dropped"):
        dropped = rewards.score(
            _checked(fn, "probe"), images, ["p"] * 4, [{}] * 4, timeout=0.2, on_error="drop", first_index=8
        )
    assert dropped.shape == (4,) and dropped.dtype == torch.float32
    if fn is _nan_at_1_and_3:  # only the bad samples are dropped; the others keep their values
        expected = images.mean(dim=(1, 2, 3))
        assert torch.isnan(dropped[[1, 3]]).all() and torch.equal(dropped[[0, 2]], expected[[0, 2]])
    else:
        assert torch.isnan(dropped).all()


def test_masked_ppo_loss_equals_the_loss_of_the_kept_samples():
    g = torch.Generator().manual_seed(0)
    new, old, adv = (torch.randn(6, generator=g) * s for s in (1e-4, 1e-4, 1.0))
    valid = torch.tensor([True, False, True, True, False, True])
    loss, stats = ppo_loss(new, old, adv, 1e-4, 5.0, valid)
    kept_loss, kept_stats = ppo_loss(new[valid], old[valid], adv[valid], 1e-4, 5.0)
    torch.testing.assert_close(loss, kept_loss)
    torch.testing.assert_close(stats.clipfrac, kept_stats.clipfrac)
    zero, _ = ppo_loss(new, old, adv, 1e-4, 5.0, torch.zeros(6, dtype=torch.bool))
    assert zero.item() == 0.0


def test_dropped_samples_leave_the_epoch_and_the_run_goes_on(tmp_path, monkeypatch):
    (tmp_path / "flaky.py").write_text(
        "import torch\n"
        "def reward(images, prompts, metadata):\n"
        "    values = images.mean(dim=(1, 2, 3))\n"
        "    return torch.where(torch.tensor(['square' in p for p in prompts]), float('nan'), values)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = {}
    original = learner_module.Learner.train_epoch

    def spy(learner, loss_fn, batch, *args):
        seen.setdefault("valid", []).append(batch.trained.clone())
        seen.setdefault("advantages", []).append(batch.values["advantages"].clone())
        return original(learner, loss_fn, batch, *args)

    monkeypatch.setattr(learner_module.Learner, "train_epoch", spy)
    overrides = [
        "reward.name=flaky:reward",
        "prompts.source=[a red square, a blue circle]",
        "run.num_epochs=2",
    ]
    with pytest.warns(RuntimeWarning, match="reward 'flaky:reward' returned non-finite values"):
        train(_config(tmp_path, "drop", *overrides, "reward.on_error=drop"))
    records = _metrics(tmp_path / "drop")
    for record, valid, advantages in zip(records, seen["valid"], seen["advantages"]):
        assert record["num_dropped"] == (~valid).sum().item() > 0
        assert (
            record["num_samples"] == valid.sum().item() > 0 and record["reward_mean"] == record["reward_mean"]
        )
        assert (advantages[~valid] == 0).all()
    with pytest.raises(
        RewardError, match=r"reward 'flaky:reward' returned non-finite values on sample indices"
    ):
        train(_config(tmp_path, "fail", *overrides))


# ---------------------------------------------------------------------------- numerical faults


def test_ratio_check_passes_for_the_sampling_policy_and_names_a_changed_one(tiny_sd):
    pipe = tiny_sd
    config = load_config(TINY, FAST)
    traj = sample_trajectories(
        pipe, ["a", "b", "c", "d"], SamplerSettings(num_steps=4), generator=torch.Generator().manual_seed(0)
    )
    data = traj
    idx, step = torch.arange(4), torch.tensor([0, 1, 2, 3])
    accelerator = Accelerator(cpu=True)

    def log_ratio(stored):
        with torch.no_grad():
            return step_log_prob(pipe.unet, pipe, data, idx, step, config, accelerator) - stored[idx, step]

    check_log_ratios(log_ratio(data.log_probs), config, accelerator, epoch=0)  # the same policy: passes
    tampered = data.log_probs + 0.05  # as if sampled by another policy or dtype
    with pytest.raises(
        NumericalError,
        match=r"epoch 5: re-scoring stored actions .* mean \|log ratio\| of 0.05 > train.ratio_tolerance=0.01",
    ):
        check_log_ratios(log_ratio(tampered), config, accelerator, epoch=5)
    config.model.mixed_precision = "bf16"
    with pytest.raises(NumericalError, match="Likely cause: model.mixed_precision=bf16"):
        check_log_ratios(log_ratio(tampered), config, accelerator, epoch=5)
    config.train.ratio_tolerance = 0.0  # off
    check_log_ratios(log_ratio(tampered), config, accelerator, epoch=5)
    config.train.ratio_tolerance, config.model.mixed_precision = 0.01, "no"
    config.sample.eta = 0.8  # a sampler that differs from the one that sampled
    with pytest.raises(NumericalError, match="the training step differs from the sampler"):
        check_log_ratios(log_ratio(data.log_probs), config, accelerator, epoch=1)


def test_training_checks_the_first_term_of_every_epoch_without_an_extra_unet_call(tmp_path, monkeypatch):
    # tiny_compressibility FAST: 2 minibatches, each one pass over its 4 timesteps (timesteps_per_pass
    # auto on the CPU) = 2 loss terms per epoch, one UNet call each
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return step_output(*args, **kwargs)

    monkeypatch.setattr(learner_module, "step_output", counted)
    train(_config(tmp_path, "counted", "run.num_epochs=2"))
    assert len(calls) == 2 * 2

    def drifted(*args, **kwargs):  # the training forward disagrees with the sampler from epoch 1 on
        calls.append(1)
        out = step_output(*args, **kwargs)
        return dataclasses.replace(out, log_prob=out.log_prob + (0.05 if len(calls) > 2 else 0.0))

    calls.clear()
    monkeypatch.setattr(learner_module, "step_output", drifted)
    with pytest.raises(NumericalError, match=r"epoch 1: re-scoring stored actions .* of 0.05 > "):
        train(_config(tmp_path, "drifted", "run.num_epochs=2"))
    assert len(calls) == 3  # epoch 1 stopped at its first term, before any update


def _poison_loss(monkeypatch, calls_to_poison):
    """Make the PPO loss NaN on the given (1-based) calls; returns the call counter."""
    calls = [0]

    def poisoned(*args, **kwargs):
        loss, stats = ppo_loss(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] in calls_to_poison else loss), stats

    monkeypatch.setattr(ddpo_module, "ppo_loss", poisoned)
    return calls


def test_nonfinite_loss_skips_the_step_and_training_continues(tmp_path, monkeypatch):
    # tiny_compressibility FAST: 2 minibatches, one pass each = 2 loss terms and 2 optimizer steps per epoch
    _poison_loss(monkeypatch, calls_to_poison={1, 2})  # both steps of epoch 0
    pipe = train(_config(tmp_path, "nan", "run.num_epochs=2", "train.gradient_accumulation_steps=1"))
    records = _metrics(tmp_path / "nan")
    assert [r["skipped_steps"] for r in records] == [2, 0]
    text = (tmp_path / "nan" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: the NaN loss is null, flagged
    assert records[0]["loss"] is None and "loss" in records[0]["nonfinite"]
    initial = {k: v.clone() for k, v in _weights(tmp_path / "nan", 0).items()}
    lora_b = [k for k in initial if "lora_B" in k]
    assert lora_b and all((initial[k] == 0).all() for k in lora_b), "no step was taken in epoch 0"
    trained = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert any((trained[k] != 0).any() for k in lora_b), "epoch 1 stepped normally"


def test_nonfinite_steps_in_a_row_stop_the_run_saying_what_and_where(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, calls_to_poison=set(range(1, 100)))
    with pytest.raises(
        NumericalError, match=r"3 optimizer steps in a row were skipped .* loss nan at minibatch \d"
    ):
        train(_config(tmp_path, "nan3", "run.num_epochs=3", "train.max_nonfinite_steps=3"))


def test_nonfinite_gradient_names_the_tensor(tmp_path, monkeypatch):
    original = trainer_module.build_learner

    def build_with_bad_grad(config, accelerator):
        learner = original(config, accelerator)
        name, param = next((n, p) for n, p in learner.pipe.unet.named_parameters() if p.requires_grad)
        param.register_hook(lambda grad: grad * float("inf"))
        build_with_bad_grad.name = name
        return learner

    monkeypatch.setattr(trainer_module, "build_learner", build_with_bad_grad)
    with pytest.raises(NumericalError, match="non-finite gradients in 1 tensors, e.g. ") as err:
        train(_config(tmp_path, "grad", "run.num_epochs=2", "train.max_nonfinite_steps=2"))
    assert build_with_bad_grad.name in str(err.value)


# ---------------------------------------------------------------------------- bad input, before any model loads


BAD_INPUT = [
    ("train.learning_rte=1e-4", "unknown key 'train.learning_rte'; did you mean 'train.learning_rate'?"),
    ("train.batch_size=four", "train.batch_size: expected int, got str 'four'"),
    ("train.clip_range=-1", "train.clip_range: must be > 0, got -1.0"),
    ("sample.eta=0", "sample.eta: must be > 0 for ddpo, which trains on step log-probabilities"),
    (
        "sample.resolution=30",
        "sample.resolution: 30 is not a multiple of 4, the VAE downsampling factor of tiny-sd",
    ),
    ("train.batch_size=3", "train.batch_size: sample.batch_size * sample.num_batches_per_epoch = 8 samples"),
    (
        "model.pretrained={tmp}/no-such-model",
        "no-such-model: not a diffusers pipeline folder (no model_index.json there)",
    ),
    (
        "model.pretrained=someone/unknown-model",
        "someone/unknown-model: could not load model_index.json from the hub",
    ),
    ("prompts.source={tmp}/missing.txt", "missing.txt': no such file, and not a built-in set"),
    ("prompts.source={tmp}/empty.txt", "empty.txt' holds no prompts"),
    ("reward.name=no_such_module:score", "reward 'no_such_module:score': cannot import 'score' from module"),
    ("reward.name=jpeg", "unknown reward 'jpeg'; built-ins: jpeg_compressibility"),
    ("run.resume_from={tmp}/nowhere", "nowhere: not a run folder (no config.yaml)"),
]


@pytest.mark.parametrize("override, message", BAD_INPUT, ids=[row[0].split("=")[0] for row in BAD_INPUT])
def test_bad_input_is_one_line_before_any_model_loads(override, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(learner_module, "load_pipeline", no_loading)
    args = ["train", TINY, *FAST, f"run.output_dir={tmp_path}/runs", override.format(tmp=tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffrl: error: "), err
    assert message in err, err
    assert not (tmp_path / "runs").exists(), "nothing is written before the checks pass"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(InputFileError, match=r"labels.jsonl:2: Expecting"):
        read_jsonl(path, strict=True)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(InputFileError, match=r"labels.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path, strict=True)
    path.write_text('{"a": 1}\n{"a": 2}\n{"a":')  # an append torn by a crash is not an error
    assert read_jsonl(path, strict=True) == [{"a": 1}, {"a": 2}]


def test_missing_pipeline_is_reported_by_the_loader_too(tmp_path):
    with pytest.raises(PipelineNotFoundError, match="not a diffusers pipeline folder"):
        trainer_module.inspect_pipeline(str(tmp_path))


# ---------------------------------------------------------------------------- config fuzzing

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffrl.errors import ConfigError  # noqa: E402

_KEYS = [
    "train",
    "sample",
    "model",
    "run",
    "reward",
    "prompts",
    "algorithm",
    "train.learning_rate",
    "sample.num_steps",
    "sample.eta",
    "train.batch_size",
    "model.mixed_precision",
    "reward.kwargs",
    "prompts.source",
    "run.seed",
    "run.resume_from",
    "sample.resolution",
    "train.lr",
    "x.y.z",
    "",
    ".",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["no", "1e-4", "1e999", "-.inf", "[1", "{a: 1}", "~", "!!python/none", "&a *a"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(st.text(max_size=200), st.builds(lambda v: __import__("yaml").safe_dump(v), _VALUES)),
    overrides=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_KEYS), st.text(max_size=20)),
        ),
        max_size=4,
    ),
)
def test_random_yaml_and_overrides_load_or_raise_config_error(tmp_path, text, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, overrides)
    except ConfigError:
        pass


# ---------------------------------------------------------------------------- untrusted files


def test_nothing_unpickles_arbitrary_objects():
    """Weights are read as safetensors or with torch.load(weights_only=True); no pickle, no unsafe YAML."""
    offenders = []
    for path in [*ROOT.glob("diffrl/**/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("triton_kernels/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            unsafe = (
                ("torch.load(" in line and "weights_only=True" not in line)
                or re.search(r"\bimport (c?pickle|dill|joblib)\b|allow_pickle=True", line)
                or ("yaml.load(" in line and "Loader=_Yaml12Loader" not in line)
                or "yaml.unsafe_load" in line
            )
            if unsafe:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------- crash safety

CRASH = [*FAST, "run.num_epochs=3", "run.deterministic=true", "reward.name=jpeg_compressibility"]
# Per epoch (FAST): 2 sampling batches, 2 reward calls, 2 minibatches of one pass over their 4 timesteps
# = 2 loss terms, 1 checkpoint, 1 metrics line; the before-training grid adds one sampling and one
# reward call first.
KILLS = [
    ("sampling", 2),  # epoch 0's first batch, before any checkpoint: resume starts over
    ("reward", 4),  # epoch 1's first reward call
    ("training", 6),  # epoch 2's second term, mid-update
    ("checkpoint", 2),  # epoch 1's checkpoint: weights written, the rest not (a torn .tmp folder)
    ("metrics", 3),  # epoch 2's metrics line written, its checkpoint not
]


def _subprocess_env():
    """The killed run's environment: this process's torch threads (bitwise equality with the
    reference run, trained here, needs the same reduction order; under ``pytest -n`` it is 1)."""
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    train(_config(out, "ref", *CRASH))
    return out / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("point, count", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_anywhere_then_resume_equals_the_uninterrupted_run(point, count, reference_run, tmp_path):
    args = [TINY, *CRASH, f"run.output_dir={tmp_path}", "run.name=crash"]
    killed = subprocess.run(
        [sys.executable, str(HERE / "fault_train.py"), point, str(count), *args],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "crash"
    assert not (run / "checkpoints" / "epoch_0002").exists(), "killed before the end"
    train(resolve_train_config(None, [], str(run)))
    for name, tensor in _weights(reference_run, 2).items():
        assert torch.equal(tensor, _weights(run, 2)[name]), name
    assert _metrics(run) == _metrics(reference_run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == "epoch_0002" and all(re.fullmatch(r"epoch_\d{4}", n) for n in names), names
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and not (run / "lora.tmp").exists()


GRPO = str(ROOT / "configs" / "grpo" / "tiny_geneval.yaml")
GRPO_CRASH = [
    "sample.num_steps=4", "sample.batch_size=8", "train.batch_size=4", "train.gradient_accumulation_steps=1",
    "grpo.group_size=4", "prompts.source=toy_train_single", "reward.name=jpeg_compressibility",
    "run.num_epochs=3", "run.save_freq=1", "run.deterministic=true", "train.ema=true", "train.ema_every=1",
]  # fmt: skip


@pytest.mark.slow
def test_grpo_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path):
    """GRPO's state (grouped prompt draws, the KL's reference pass, the moving average of the
    weights) resumes crash-exact too: killed at epoch 1's reward call (the grid, epoch 0 and epoch 1
    make one call each)."""
    train(resolve_train_config(GRPO, [*GRPO_CRASH, f"run.output_dir={tmp_path}", "run.name=ref"], None))
    args = [GRPO, *GRPO_CRASH, f"run.output_dir={tmp_path}", "run.name=crash"]
    killed = subprocess.run(
        [sys.executable, str(HERE / "fault_train.py"), "reward", "3", *args],
        env=_subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "crash"
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0], "killed in epoch 1"
    train(resolve_train_config(None, [], str(run)))
    for name, tensor in _weights(tmp_path / "ref", 2).items():
        assert torch.equal(tensor, _weights(run, 2)[name]), name
    for name, tensor in _weights(tmp_path / "ref", 2, "ema").items():
        assert torch.equal(tensor, _weights(run, 2, "ema")[name]), name
    assert _metrics(run) == _metrics(tmp_path / "ref")


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_epoch_and_exits(tmp_path):
    args = [
        TINY,
        *FAST,
        "run.num_epochs=1000",
        "run.save_freq=1000",
        f"run.output_dir={tmp_path}",
        "run.name=term",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "diffrl.cli", "train", *args],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while not read_jsonl(metrics) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM after epoch" in stderr and "diffrl train --resume" in stderr
    last = read_jsonl(metrics)[-1]["epoch"]
    checkpoints = [p.name for p in (tmp_path / "term" / "checkpoints").iterdir()]
    assert checkpoints == [f"epoch_{last:04d}"], "save_freq=1000, yet the stop saved the epoch it finished"
