"""Toy-GenEval (issue #21): GenEval's layout and rule on hand-made detections, the toy world's six
tasks rendered and verified (perfect renders pass; each single-attribute corruption fails exactly
its check), the JSONL round trip, the reward, and the suite against the shipped baseline."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl import geneval, rewards
from diffrl import toyworld as tw
from diffrl.cli import main
from diffrl.errors import InputFileError
from diffrl.geneval import Detection, correct, partial_credit, relations, select
from diffrl.rewards.shapes import TOY_THRESHOLDS, detect

ROOT = Path(__file__).parent.parent
THRESHOLDS = (0.9, 0.3)  # GenEval's, for the hand-made detections


def box(x, y, half=4.0):
    return (x - half, y - half, x + half, y + half)


def verdict(image: np.ndarray, row: dict) -> tuple[bool, list[str], float]:
    """(correct, reasons, partial credit) of a uint8 image for ``row`` with the toy detector."""
    by_class = select(detect(image.astype(np.float32) / 255), row["tag"], TOY_THRESHOLDS)
    ok, reasons = correct(by_class, row)
    return ok, reasons, partial_credit(by_class, row)


# ---------------------------------------------------------------------------- the rule, by hand


def test_counting_needs_exactly_n_through_the_exclude_item():
    row = {
        "tag": "counting",
        "prompt": "a photo of two triangles",
        "include": [{"class": "triangle", "count": 2}],
        "exclude": [{"class": "triangle", "count": 3}],
    }
    found = lambda k: [Detection("triangle", 0.95, box(8 + 8 * i, 8)) for i in range(k)]  # noqa: E731
    assert correct(select(found(2), "counting", THRESHOLDS), row) == (True, [])
    assert correct(select(found(3), "counting", THRESHOLDS), row) == (
        False,
        ["expected triangle < 3, found 3"],
    )
    assert correct(select(found(1), "counting", THRESHOLDS), row) == (
        False,
        ["expected triangle >= 2, found 1"],
    )
    # counting's threshold (0.9) drops a 0.5-confidence third triangle; another task's (0.3) keeps it
    unsure = found(2) + [Detection("triangle", 0.5, box(30, 30))]
    assert correct(select(unsure, "counting", THRESHOLDS), row)[0]
    assert len(select(unsure, "two_object", THRESHOLDS)["triangle"]) == 3
    # flow_grpo's partial credit: 1 - |n - k| / n
    assert partial_credit(select(found(3), "counting", THRESHOLDS), row) == pytest.approx(0.5)
    assert partial_credit(select(found(0), "counting", THRESHOLDS), row) == 0.0


def test_colour_is_checked_on_the_most_confident_objects():
    row = {
        "tag": "colors",
        "prompt": "a photo of a red circle",
        "include": [{"class": "circle", "count": 1, "color": "red"}],
    }
    blue_first = [Detection("circle", 0.9, box(8, 8), "blue"), Detection("circle", 0.8, box(24, 24), "red")]
    assert correct(select(blue_first, "colors", THRESHOLDS), row) == (
        False,
        ["expected red circle >= 1, found 0"],
    )
    red_first = [Detection("circle", 0.9, box(8, 8), "red"), Detection("circle", 0.8, box(24, 24), "blue")]
    assert correct(select(red_first, "colors", THRESHOLDS), row) == (True, [])
    assert partial_credit(select(blue_first, "colors", THRESHOLDS), row) == pytest.approx(
        (0.0 + 0.0) / 2
    )  # 2 found of 1
    assert partial_credit(select(red_first[:1], "colors", THRESHOLDS), row) == 1.0


def test_relations_from_boxes_with_the_threshold():
    a, b = Detection("circle", 1, box(8, 16)), Detection("square", 1, box(24, 16))
    assert relations(a, b) == {"left of"} and relations(b, a) == {"right of"}
    up, down = Detection("circle", 1, box(16, 6)), Detection("square", 1, box(16, 26))
    assert relations(up, down) == {"above"} and relations(down, up) == {"below"}
    diagonal = Detection("circle", 1, box(6, 6))
    assert relations(diagonal, Detection("square", 1, box(26, 26))) == {"left of", "above"}
    # an offset smaller than 0.1 x the summed sides (16 px of boxes: 1.6 px) is no relation
    assert relations(Detection("circle", 1, box(17.5, 16)), Detection("square", 1, box(16, 16))) == set()


def test_position_is_relative_to_the_objects_matched_for_the_target():
    row = tw.geneval_row("a photo of a circle left of a square")
    left = [Detection("square", 0.9, box(24, 16)), Detection("circle", 0.9, box(8, 16))]
    right = [Detection("square", 0.9, box(8, 16)), Detection("circle", 0.9, box(24, 16))]
    assert correct(select(left, "position", THRESHOLDS), row) == (True, [])
    assert correct(select(right, "position", THRESHOLDS), row) == (False, ["expected circle left of target"])
    no_target = [Detection("circle", 0.9, box(8, 16))]
    assert correct(select(no_target, "position", THRESHOLDS), row) == (
        False,
        ["expected square >= 1, found 0", "no target for circle to be left of"],
    )
    assert partial_credit(select(right, "position", THRESHOLDS), row) == pytest.approx(2 / 3)


def test_overall_is_the_mean_of_the_task_accuracies():
    tags = ["single_object"] * 4 + ["position"] * 2
    table = geneval.summarize(tags, [True, True, True, False, False, True])
    assert table["single_object"]["accuracy"] == 0.75 and table["position"]["accuracy"] == 0.5
    assert table["overall"]["accuracy"] == pytest.approx((0.75 + 0.5) / 2)  # not 4/6
    assert table["single_object"]["stderr"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)


# ---------------------------------------------------------------------------- the toy world's tasks


def test_the_six_tasks_with_fixed_splits():
    rows = tw.geneval_rows("all")
    assert {r["tag"] for r in rows} == set(geneval.TAGS)
    train, heldout = tw.geneval_rows("train"), tw.geneval_rows("heldout")
    assert tw.geneval_rows("heldout") == heldout  # fixed
    for tag in ("counting", "colors", "position", "color_attr"):
        a = {r["prompt"] for r in train if r["tag"] == tag}
        b = {r["prompt"] for r in heldout if r["tag"] == tag}
        assert a and b and not a & b, tag
        values = lambda rs: set().union(*(tw._values(r) for r in rs))  # noqa: E731
        assert values(r for r in rows if r["tag"] == tag) == values(r for r in train if r["tag"] == tag)
    for row in rows:
        geneval.check_row(row, "toy")
        assert tw.geneval_row(row["prompt"]) == row
    assert tw.geneval_row("a photo of three triangles")["exclude"] == [{"class": "triangle", "count": 4}]
    # today's captions still parse and render
    assert tw.parse("a small red circle on the left").objects[0].position == "left"
    assert tw.render("a red circle to the left of a blue square", 0).shape == (32, 32, 3)


@pytest.mark.parametrize("tag", geneval.TAGS)
def test_perfect_renders_pass_with_full_credit(tag):
    for row in (r for r in tw.geneval_rows("all") if r["tag"] == tag):
        for seed in range(4):
            ok, reasons, credit = verdict(tw.render_row(row, seed), row)
            assert ok and credit == 1.0, (row["prompt"], seed, reasons)


def _corrupted(prompt: str, change) -> tuple[dict, dict]:
    row = tw.geneval_row(prompt)
    wrong = copy.deepcopy(row)
    change(wrong)
    return row, wrong


def _set(path, value):
    def change(row):
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


CORRUPTIONS = [
    ("a photo of three triangles", _set(("include", 0, "count"), 4), ["expected triangle < 4, found 4"]),
    ("a photo of three triangles", _set(("include", 0, "count"), 2), ["expected triangle >= 3, found 2"]),
    (
        "a photo of a blue circle",
        _set(("include", 0, "color"), "red"),
        ["expected blue circle >= 1, found 0"],
    ),
    (
        "a photo of a red circle and a blue square",
        lambda r: (_set(("include", 0, "color"), "blue")(r), _set(("include", 1, "color"), "red")(r)),
        ["expected red circle >= 1, found 0", "expected blue square >= 1, found 0"],
    ),
    (
        "a photo of a circle left of a square",
        _set(("include", 1, "position"), ["right of", 0]),
        ["expected circle left of target"],
    ),
    (
        "a photo of a triangle above a circle",
        _set(("include", 1, "position"), ["below", 0]),
        ["expected triangle above target"],
    ),
    (
        "a photo of a circle and a square",
        _set(("include", 1, "class"), "triangle"),
        ["expected square >= 1, found 0"],
    ),
]


@pytest.mark.parametrize(
    "prompt, change, reasons", CORRUPTIONS, ids=[f"{i}" for i in range(len(CORRUPTIONS))]
)
def test_each_single_attribute_corruption_fails_exactly_its_check(prompt, change, reasons):
    row, wrong = _corrupted(prompt, change)
    for seed in range(4):
        ok, got, credit = verdict(tw.render_row(wrong, seed), row)
        assert not ok and got == reasons and credit < 1.0, (seed, got)


# ---------------------------------------------------------------------------- files, reward, suite


def test_jsonl_round_trip_and_errors_name_the_line(tmp_path):
    rows = tw.geneval_rows("heldout")
    geneval.write_suite(tmp_path / "suite.jsonl", rows)
    assert geneval.read_suite(tmp_path / "suite.jsonl") == rows
    lines = (tmp_path / "suite.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["include"][0]["count"] = 0
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(bad), *lines[2:]]) + "\n")
    with pytest.raises(InputFileError, match=r"bad.jsonl:2: include\[0\].count must be an integer >= 1"):
        geneval.read_suite(tmp_path / "bad.jsonl")
    (tmp_path / "tag.jsonl").write_text(json.dumps({**rows[0], "tag": "texture"}) + "\n")
    with pytest.raises(InputFileError, match=r"tag.jsonl:1: 'tag' must be one of"):
        geneval.read_suite(tmp_path / "tag.jsonl")


def test_the_reward_gives_partial_credit_and_reports_the_strict_rule():
    reward = rewards.get("toy_geneval")
    prompts = ["a photo of two squares", "a photo of a green triangle"]
    right = torch.from_numpy(np.stack([tw.render(p, 3) for p in prompts])).permute(0, 3, 1, 2).float() / 255
    meta = [{}, {}]
    assert reward(right, prompts, meta).tolist() == [1.0, 1.0] and [m["geneval_correct"] for m in meta] == [
        1.0,
        1.0,
    ]
    three = tw.render_row({**tw.geneval_row(prompts[0]), "include": [{"class": "square", "count": 3}]}, 0)
    value = reward(torch.from_numpy(three[None]).permute(0, 3, 1, 2).float() / 255, prompts[:1], [{}])
    assert value.item() == pytest.approx(0.5)  # 1 - |2 - 3| / 2
    strict = rewards.get("toy_geneval", strict=True)
    both = torch.cat([right[:1], torch.from_numpy(three[None]).permute(0, 3, 1, 2).float() / 255])
    assert strict(both, prompts[:1] * 2, [{}, {}]).tolist() == [1.0, 0.0]  # the sparse reward: 0/1


@pytest.mark.slow
def test_the_suite_on_the_shipped_model_matches_its_baseline(tmp_path, capsys):
    baseline = json.loads((ROOT / "diffrl/assets/tiny/baseline.json").read_text())["geneval"]
    settings = baseline["settings"]
    args = ["eval", "tiny", "--suite", "toy-geneval", "--json", str(tmp_path / "g.json")]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    assert main(args) == 0
    table = json.loads((tmp_path / "g.json").read_text())["tiny"]
    assert "| tiny | " in capsys.readouterr().out
    for tag in geneval.TAGS:  # float noise across machines may flip an image, not more
        assert (
            abs(table[tag]["accuracy"] - baseline["table"][tag]["accuracy"]) <= 1.0 / table[tag]["images"]
        ), tag


def test_the_suite_scores_a_given_sampler_renders_right_and_a_count_off_by_one_wrong():
    """``evaluate_suite(sample=...)`` (guided samplers): renders of the held-out rows are right in
    every task; rendering one more object of each counting row fails exactly that task."""
    from diffrl.evaluation import evaluate_suite, load_suite
    from diffrl.rewards.shapes import detect_batch
    from diffrl.types import SamplerSettings

    rows = load_suite("toy-geneval")
    by_prompt = {r["prompt"]: r for r in rows}

    def render(prompts, generator, extra=0):
        seed = int(torch.randint(1000, (1,), generator=generator))
        scenes = []
        for prompt in prompts:
            row = copy.deepcopy(by_prompt[prompt])
            if row["tag"] == "counting":
                row["include"][0]["count"] += extra
                row["exclude"] = []
            scenes.append(tw.render_row(row, seed))
        return torch.from_numpy(np.stack(scenes)).permute(0, 3, 1, 2).float() / 255

    settings = SamplerSettings(num_steps=1)

    right = evaluate_suite(
        None, rows, detect_batch, TOY_THRESHOLDS, settings, images_per_prompt=2, sample=render
    )
    assert right["overall"]["accuracy"] == 1.0 and right["partial_credit"] == 1.0
    off = evaluate_suite(
        None, rows, detect_batch, TOY_THRESHOLDS, settings, images_per_prompt=2,
        sample=lambda prompts, generator: render(prompts, generator, extra=1),
    )  # fmt: skip
    assert off["counting"]["accuracy"] == 0.0
    assert all(off[t]["accuracy"] == 1.0 for t in off if t not in ("counting", "overall", "partial_credit"))
    assert off["overall"]["accuracy"] == pytest.approx(5 / 6)
