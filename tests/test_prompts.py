from pathlib import Path

import pytest
import torch

from diffrl.errors import InputFileError
from diffrl.prompts import load_prompts


def test_inline_and_builtin_sets():
    assert load_prompts(["a", "b"]).prompts == ["a", "b"]
    animals = load_prompts("simple_animals").prompts
    assert len(animals) == 45 and len(set(animals)) == 45
    pairs = load_prompts("nouns_activities").prompts
    assert len(pairs) == 45 * 10 and "a cat riding a bike" in pairs and "an ant playing chess" in pairs


def test_text_file_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\na red circle\n\n  a blue square  \n")
    assert load_prompts(str(path)).prompts == ["a red circle", "a blue square"]


def test_sampling_is_reproducible_and_uses_the_set():
    source = load_prompts("simple_animals")
    first = source.sample(16, torch.Generator().manual_seed(0))
    assert first == source.sample(16, torch.Generator().manual_seed(0))
    assert set(first) <= set(source.prompts) and len(set(first)) > 1


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(InputFileError, match="missing.txt"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(InputFileError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))


def test_a_geneval_jsonl_file_gives_its_rows_prompts_and_names_a_bad_line(tmp_path):
    from diffrl import geneval, toyworld

    rows = [toyworld.geneval_row(p) for p in ["a photo of three triangles", "a photo of a blue circle"]]
    geneval.write_suite(tmp_path / "suite.jsonl", rows)
    assert load_prompts(str(tmp_path / "suite.jsonl")).prompts == [r["prompt"] for r in rows]
    (tmp_path / "bad.jsonl").write_text('{"tag": "counting", "prompt": "x", "include": []}\nnot json\n')
    with pytest.raises(InputFileError, match="bad.jsonl:"):
        load_prompts(str(tmp_path / "bad.jsonl"))


def test_task_balance_draws_each_task_equally_then_its_prompts_uniformly():
    source = load_prompts("toy_train_geneval", balance="task")
    task_of = dict(zip(source.prompts, source.tasks, strict=True))
    sizes = {t: source.tasks.count(t) for t in set(source.tasks)}
    assert len(sizes) == 6 and min(sizes.values()) < max(sizes.values()) / 10  # unbalanced: 3 vs 58 prompts
    n = 12_000
    draws = source.sample(n, torch.Generator().manual_seed(0))
    # each task with probability 1/6: within 5 binomial standard deviations
    for task in sizes:
        share = sum(task_of[p] == task for p in draws) / n
        assert abs(share - 1 / 6) < 5 * (1 / 6 * 5 / 6 / n) ** 0.5, (task, share)
    # within a task uniformly: Pearson's chi-square over all prompts, expected n / 6 / |task|,
    # below its mean + 5 standard deviations (df = prompts - 1: mean df, variance 2 df)
    counts = {p: 0 for p in source.prompts}
    for p in draws:
        counts[p] += 1
    expected = {p: n / 6 / sizes[task_of[p]] for p in source.prompts}
    chi2 = sum((counts[p] - expected[p]) ** 2 / expected[p] for p in source.prompts)
    df = len(source.prompts) - 1
    assert chi2 < df + 5 * (2 * df) ** 0.5
    assert source.sample(32, torch.Generator().manual_seed(1)) == source.sample(
        32, torch.Generator().manual_seed(1)
    )


def test_task_balance_reads_jsonl_tags_and_names_a_source_without_tasks(tmp_path):
    from diffrl import geneval, toyworld
    from diffrl.errors import ConfigError

    rows = [toyworld.geneval_row(p) for p in ["a photo of three triangles", "a photo of a blue circle"]]
    geneval.write_suite(tmp_path / "suite.jsonl", rows)
    assert load_prompts(str(tmp_path / "suite.jsonl"), balance="task").tasks == ["counting", "colors"]
    with pytest.raises(ConfigError, match="prompts.balance: task needs .* 'simple_animals' has none"):
        load_prompts("simple_animals", balance="task")


def test_prompts_tasks_keeps_the_rows_of_those_tasks_in_order_and_names_what_it_refuses(tmp_path):
    from diffrl import geneval, toyworld
    from diffrl.errors import ConfigError

    rows = toyworld.geneval_rows("train")
    wanted = ["colors", "color_attr"]
    kept = load_prompts("toy_train_geneval", tasks=wanted)
    assert kept.prompts == [r["prompt"] for r in rows if r["tag"] in wanted]
    assert kept.tasks == [r["tag"] for r in rows if r["tag"] in wanted]
    assert 0 < len(kept.prompts) < len(rows)
    # with balance: task, each kept task half of the draws, and no other task's prompt drawn
    balanced = load_prompts("toy_train_geneval", balance="task", tasks=wanted)
    task_of = dict(zip(balanced.prompts, balanced.tasks, strict=True))
    draws = [task_of[p] for p in balanced.sample(4000, torch.Generator().manual_seed(0))]
    assert set(draws) == set(wanted) and abs(draws.count("colors") / 4000 - 0.5) < 5 * (0.25 / 4000) ** 0.5
    geneval.write_suite(tmp_path / "suite.jsonl", rows[:5])
    with pytest.raises(
        ConfigError, match=r"prompts.tasks: colour not among the tasks of prompts.source '.*suite.jsonl'"
    ):
        load_prompts(str(tmp_path / "suite.jsonl"), tasks=["colour"])
    with pytest.raises(ConfigError, match="prompts.tasks: an empty list keeps no prompt"):
        load_prompts("toy_train_geneval", tasks=[])
    with pytest.raises(ConfigError, match="prompts.tasks needs .* 'simple_animals' has none"):
        load_prompts("simple_animals", tasks=["colors"])


def test_the_trainers_preflight_draws_only_the_configured_tasks(tmp_path):
    """``prompts.tasks`` from a config reaches the prompt source the trainer samples from."""
    from diffrl import algorithms, toyworld
    from diffrl.config import load_config
    from diffrl.trainer import preflight

    config = load_config(
        Path(__file__).resolve().parent.parent / "configs/grpo/tiny_flow_geneval.yaml",
        [f"run.output_dir={tmp_path}", "prompts.tasks=[counting]"],
    )
    source = preflight(config, algorithms.get(config.algorithm), torch.device("cpu"))[0]
    assert source.prompts == [r["prompt"] for r in toyworld.geneval_rows("train") if r["tag"] == "counting"]
