"""The algorithm seam: the registry, a loop that names no algorithm, an algorithm added from one
file outside the package, and the resolved-config printout of every shipped config."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from diffrl import algorithms
from diffrl.cli import main
from diffrl.config import ConfigError, load_config, to_dict
from diffrl.files import read_jsonl
from diffrl.learner import auto_timesteps_per_pass
from tests.conftest import TRAINING_CONFIGS

ROOT = Path(__file__).parent.parent
PLUGINS = Path(__file__).parent / "plugins"
CONFIGS = TRAINING_CONFIGS


def test_every_registered_algorithm_exports_the_interface():
    for name in algorithms.REGISTRY:
        algorithm = algorithms.get(name)
        if algorithm.offline:
            assert callable(algorithm.term) and callable(algorithm.setup), name
        else:
            assert callable(algorithm.plan) and callable(algorithm.prepare), name
            assert callable(algorithm.loss) or callable(algorithm.train), name
            assert algorithm.models and set(algorithm.models) <= {"ddim", "lcm", "flow"}, name
        if algorithm.section:
            assert isinstance(
                getattr(load_config(None, [f"algorithm={name}", "dpo.data=x"]), algorithm.section),
                algorithm.module.Config,
            )


def test_an_online_module_without_loss_or_train_is_refused_naming_them(tmp_path, monkeypatch):
    (tmp_path / "half_method.py").write_text("def plan(config, epoch): pass\ndef prepare(ctx, r, e): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"does not define loss \(or train\)"):
        algorithms.get("half_method")


def test_unknown_algorithm_is_named():
    with pytest.raises(ConfigError, match="algorithm: 'ppo2' is not a registered algorithm"):
        load_config(None, ["algorithm=ppo2"])


@pytest.mark.parametrize("module", ["trainer", "offline"])
def test_the_loops_name_no_algorithm(module):
    source = (ROOT / "diffrl" / f"{module}.py").read_text().lower()
    names = [n for n in algorithms.REGISTRY if re.search(rf"\b{n}\b", source)]
    assert not names, f"diffrl/{module}.py mentions {names}"
    assert "config.algorithm ==" not in source and "config.algorithm in" not in source


def _windows(path: Path, size: int = 4) -> set[tuple[str, ...]]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [
        line for line in lines if len(line) > 12 and not line.startswith(("#", '"""', "from ", "import "))
    ]
    return {tuple(lines[i : i + size]) for i in range(len(lines) - size + 1)}


def test_no_logic_written_twice_between_the_online_and_offline_loops():
    shared = _windows(ROOT / "diffrl" / "trainer.py") & _windows(ROOT / "diffrl" / "offline.py")
    assert not shared, shared


def test_reinforce_baselines_are_per_prompt(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    import reinforce

    rewards = torch.tensor([1.0, 3.0, 10.0, 0.0, 20.0])
    prompts = ["a", "a", "b", "c", "b"]
    expected = torch.tensor([1 - 2, 3 - 2, 10 - 15, 0.0, 20 - 15])
    torch.testing.assert_close(reinforce.baselined(prompts, rewards), expected)


def test_an_algorithm_from_one_file_outside_the_package_trains_the_tiny_model(tmp_path, monkeypatch):
    """REINFORCE (tests/plugins/reinforce.py) registered by name, one epoch on the shipped tiny model:
    its loss is the one its module computes, and the adapters moved."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setattr(algorithms, "REGISTRY", dict(algorithms.REGISTRY))  # registered for this test only
    algorithms.register("reinforce", "reinforce")
    assert algorithms.get("reinforce").loss.__module__ == "reinforce"
    from diffrl.trainer import train

    config = load_config(
        ROOT / "configs" / "ddpo" / "tiny_alignment.yaml",
        ["algorithm=reinforce", "run.num_epochs=1", f"run.output_dir={tmp_path}", "run.name=r",
         "sample.batch_size=8", "train.batch_size=4", "train.learning_rate=1e-2",
         "prompts.source=[a red circle to the left of a green circle, a red circle to the right of a green circle]"],
    )  # fmt: skip
    pipe = train(config)
    (record,) = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert record["num_trained"] == 8 and record["abs_advantage"] > 0 and record["loss"] == record["loss"]
    lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any((p != 0).any() for p in lora_b), "one epoch of updates moved the adapters"


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_print_config_marks_where_each_value_came_from(path, capsys):
    """``--print-config`` reads back as the resolved config; every key set in the file says file,
    an override says override, and the algorithm's defaults say so where the file left them unset."""
    assert main(["train", str(path), "run.num_epochs=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    config = load_config(path, ["run.num_epochs=7"])
    assert yaml.safe_load(out) == yaml.safe_load(yaml.safe_dump(to_dict(config)))
    marks = dict(re.findall(r"^\s*(\w+): .*#\s(file|override|algorithm defaults|default)$", out, flags=re.M))
    assert marks["num_epochs"] == "override"
    file_keys = yaml.safe_load(path.read_text())
    for section, values in file_keys.items():
        if isinstance(values, dict):
            for key in values:
                if key != "num_epochs" and key in marks and not isinstance(values[key], dict):
                    line = re.search(rf"^{section}:\n(?:  .*\n)*?  {key}: .*# (\S.*)$", out, flags=re.M)
                    assert line and line.group(1) == "file", (section, key)
    for section, values in algorithms.get(config.algorithm).defaults.items():
        for key in values:
            if key not in (file_keys.get(section) or {}):
                line = re.search(rf"^{section}:\n(?:  .*\n)*?  {key}: .*# (\S.*)$", out, flags=re.M)
                assert line and line.group(1) == "algorithm defaults", (section, key)


def test_auto_timesteps_per_pass_takes_all_on_cpu_and_what_memory_holds_on_cuda():
    assert auto_timesteps_per_pass(20, torch.device("cpu"), None, None) == 20
    cuda = torch.device("cuda")
    assert auto_timesteps_per_pass(20, cuda, pass_bytes=1_000, free_bytes=10_000) == 8  # 0.8 · 10k / 1k
    assert auto_timesteps_per_pass(20, cuda, pass_bytes=1_000, free_bytes=10**9) == 20
    assert auto_timesteps_per_pass(20, cuda, pass_bytes=10**9, free_bytes=1_000) == 1


def _module_imports() -> dict[str, set[str]]:
    """diffrl's modules -> the diffrl modules each imports at module level (``from diffrl import x``
    counts as importing ``diffrl.x`` when x is a module)."""
    import ast

    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "diffrl").rglob("*.py")}  # fmt: skip
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffrl"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(files)
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        graph[name] = {d for d in deps if d in files and d != name and d != "diffrl"}
    return graph


def test_no_import_cycle():
    graph, done, path = _module_imports(), set(), []

    def visit(module):
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module) :] + [module])
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert "diffrl.trainer" not in set().union(*graph.values()), "nothing imports the online loop"


def test_merge_lora_auto_stops_merging_once_the_ratio_check_strays():
    from accelerate import Accelerator

    from diffrl.learner import MERGE_TOLERANCE, Learner, NonFiniteGuard

    def learner(*overrides):
        config = load_config(None, ["model.pretrained=tiny-sd", *overrides])
        unet = torch.nn.Linear(2, 2)
        return Learner(
            unet, None, None, list(unet.parameters()), Accelerator(cpu=True), NonFiniteGuard(1), config
        )

    auto = learner()
    assert auto.merge_sampling
    auto.check_ratios(torch.full((4,), MERGE_TOLERANCE / 2), epoch=0)
    assert auto.merge_sampling, "within 1e-5 of ratio 1: still merged"
    auto.check_ratios(torch.tensor([0.0, 4 * MERGE_TOLERANCE]), epoch=1)
    assert not auto.merge_sampling, "above: unmerged from now on"
    forced = learner("sample.merge_lora=true")
    forced.check_ratios(torch.full((4,), 1e-3), epoch=0)
    assert forced.merge_sampling
    assert not learner("sample.merge_lora=false").merge_sampling
    assert not learner("model.mixed_precision=bf16").merge_sampling
    assert not learner("model.use_lora=false").merge_sampling
