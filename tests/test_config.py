import pytest

from diffrl.config import Config, ConfigError, dump_yaml, load_config
from tests.conftest import TRAINING_CONFIGS

CONFIGS = TRAINING_CONFIGS


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_config_loads_and_names_its_command(path):
    config = load_config(path)
    assert isinstance(config, Config)
    header = path.read_text().splitlines()[:4]
    assert any(str(path.relative_to(path.parent.parent.parent)) in line for line in header), (
        "header must give the command"
    )


REAL_MODEL_CONFIGS = [p for p in CONFIGS if not load_config(p).model.pretrained.startswith("tiny")]


@pytest.mark.parametrize("path", REAL_MODEL_CONFIGS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_real_model_config_reports_a_reward_it_does_not_optimise(path):
    """SD, SD3.5, FLUX and LCM configs (not the embedded toy models') name an evaluation reward
    other than their training reward (issue #24)."""
    config = load_config(path)
    names = {spec["name"] for spec in config.eval.rewards}
    assert names - {config.reward.name}, f"{path}: eval.rewards names no reward besides {config.reward.name}"


def test_overrides_are_typed_yaml():
    config = load_config(
        None,
        [
            "train.learning_rate=1e-4",
            "train.cfg=false",
            "prompts.source=[a cat, a dog]",
            "sample.resolution=512",
            "run.resume_from=null",
        ],
    )
    assert config.train.learning_rate == 1e-4 and config.train.cfg is False
    assert config.prompts.source == ["a cat", "a dog"] and config.sample.resolution == 512
    assert config.train.adam_beta1 == 0.9  # untouched defaults are the paper's


def test_dumped_config_reads_back_equal(tmp_path):
    config = load_config(None, ["model.pretrained=tiny-sd", "reward.kwargs={quality: 80}"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=1", r"unknown key 'train.lr' \(valid keys of train: learning_rate, adam_beta1"),
        ("train.learning_rte=1", r"unknown key 'train.learning_rte'; did you mean 'train.learning_rate'\?"),
        (
            "trian.learning_rate=1",
            r"unknown key 'trian'; did you mean 'train'\? \(valid keys of the top level",
        ),
        ("train.learning_rate=.nan", r"train.learning_rate: must be a finite number"),
        ("train.learning_rate=1e999", r"train.learning_rate: must be a finite number"),
        ("train.learning_rate=fast", r"train.learning_rate: expected float, got str 'fast'"),
        ("train.learning_rate=[1", r"override 'train.learning_rate=\[1': the value is not valid YAML"),
        ("train.max_nonfinite_steps=0", r"train.max_nonfinite_steps: must be >= 1"),
        ("train.ratio_tolerance=-1", r"train.ratio_tolerance: must be >= 0"),
        ("reward.on_error=ignore", r"reward.on_error: 'ignore' is not one of \['fail', 'drop'\]"),
        ("reward.timeout=0", r"reward.timeout: must be > 0 seconds or null"),
        ("sample.num_steps=5000", r"sample.num_steps: must be <= 1000"),
        ("sample.resolution=-8", r"sample.resolution: must be in \[1, 8192\] pixels"),
        ("train.batch_size.x=1", r"train.batch_size: expected int, got dict"),
        ("train.learning_rate=-0.1", r"train.learning_rate: must be > 0"),
        ("train.timestep_fraction=0", r"train.timestep_fraction: must be in \(0, 1\]"),
        ("train.timestep_fraction=1.5", r"train.timestep_fraction: must be in \(0, 1\]"),
        ("train.batch_size=3", r"train.batch_size: .* 32 samples per process must be a multiple of .* = 3"),
        (
            "train.gradient_accumulation_steps=3",
            r"must be a multiple of train.batch_size \* train.gradient_accumulation_steps = 12",
        ),
        ("sample.batch_size=0", r"sample.batch_size: must be >= 1"),
        ("sample.eta=0", r"sample.eta: must be > 0 for ddpo, which trains on step log-probabilities"),
        ("train.cfg=maybe", r"train.cfg: expected bool, got str"),
        ("run.num_epochs=2.5", r"run.num_epochs: expected int, got float"),
        ("model.attention=flash", r"model.attention: 'flash' is not one of \['auto', 'sdpa', 'xformers'\]"),
        ("model.mixed_precision=fp8", r"model.mixed_precision: 'fp8' is not one of"),
        ("run.log_with=mlflow", r"run.log_with: 'mlflow' is not one of"),
        ("train.adam_beta2=1.0", r"train.adam_beta2: must be in \[0, 1\)"),
        ("train", r"override 'train' must look like section.key=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_file_errors_name_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 1\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("sample:\n  num_step: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'sample.num_step'; did you mean 'sample.num_steps'"):
        load_config(typo)
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- sample\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of sections, got list"):
        load_config(listed)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train:\n  batch_size: \xff\xfe\n")
    with pytest.raises(ConfigError, match="binary.yaml: not UTF-8 text"):
        load_config(binary)
