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
