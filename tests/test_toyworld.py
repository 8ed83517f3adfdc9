import itertools

import pytest
import torch
import torchvision.transforms.functional as TF

from diffrl import rewards
from diffrl import toyworld as tw
from diffrl.prompts import load_prompts
from diffrl.rewards.shapes import score_shapes


def _all(kind):
    return tw.prompts("train", kind) + tw.prompts("heldout", kind)


def test_splits_are_disjoint_and_heldout_combinations_never_rendered_in_training():
    for kind in ("single", "pair"):
        train, heldout = set(tw.prompts("train", kind)), set(tw.prompts("heldout", kind))
        assert train and heldout and not train & heldout
    train_triples = {
        (o.color, o.shape, o.position)
        for o in (tw.parse(p).objects[0] for p in tw.prompts("train", "single"))
    }
    for p in tw.prompts("heldout", "single"):
        o = tw.parse(p).objects[0]
        assert (o.color, o.shape, o.position) not in train_triples
    train_tuples = {
        tuple(itertools.chain(*((o.color, o.shape) for o in tw.parse(p).objects)))
        for p in tw.prompts("train", "pair")
    }
    for p in tw.prompts("heldout", "pair"):
        assert tuple(itertools.chain(*((o.color, o.shape) for o in tw.parse(p).objects))) not in train_tuples
    # every single attribute value is still seen in training
    words = {w for p in tw.prompts("train", "single") for w in p.split()}
    assert (
        set(tw.COLORS) | set(tw.SHAPES) | set(tw.SIZES) | {"left", "right", "top", "bottom", "center"}
        <= words
    )
    assert load_prompts("toy_heldout_single").prompts == tw.prompts("heldout", "single")


def test_captions_parse_back_and_bad_captions_are_named():
    for p in _all("single") + _all("pair"):
        assert tw.caption(tw.parse(p)) == p
    with pytest.raises(ValueError, match="not a toy-world caption: 'a purple circle'"):
        tw.parse("a purple circle")
    with pytest.raises(ValueError, match="different colours"):
        tw.parse("a red circle above a red square")


def test_render_draws_the_stated_colour_and_is_seeded():
    image = tw.render("a large red square in the center", seed=0)
    assert image.shape == (32, 32, 3) and tuple(image[16, 16]) == tw.COLORS["red"]
    assert tuple(image[0, 0]) == tw.BACKGROUND
    assert (
        tw.render("a small blue circle on the left", 3) == tw.render("a small blue circle on the left", 3)
    ).all()


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_renders_of_their_own_prompt_score_high(kind):
    prompts = _all(kind)
    result = score_shapes(tw.render_batch(prompts, seed=1), prompts)
    assert result.score.mean() >= 0.95
    assert result.exact.mean() >= 0.85


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_renders_of_a_different_prompt_score_clearly_lower(kind):
    prompts = _all(kind)
    images = tw.render_batch(prompts, seed=1)
    shuffled = prompts[7:] + prompts[:7]
    assert score_shapes(images, shuffled).score.mean() < 0.8


def test_hand_computed_partial_credit():
    image = tw.render_batch(["a small red circle on the left"], seed=0)
    # colour wrong, shape right, size wrong, position right -> 2 of 4
    result = score_shapes(image, ["a large blue circle on the left"])
    assert result.score.item() == pytest.approx(0.5) and result.exact.item() == 0
    assert result.attributes["color"].item() == 0 and result.attributes["position"].item() == 1
    assert torch.isnan(result.attributes["relation"]).item()
    pair = tw.render_batch(["a red circle to the left of a blue square"], seed=0)
    # both colours present (2), shapes: circle right, triangle wrong (1), relation wrong (0) -> 3 of 5
    result = score_shapes(pair, ["a red circle to the right of a blue triangle"])
    assert result.score.item() == pytest.approx(3 / 5)


def test_pure_noise_scores_at_most_chance():
    prompts = _all("single")
    noise = torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # chance for a random valid render: (1/4 colour + 1/3 shape + 1/2 size + 1/5 position) / 4 ~ 0.32
    assert score_shapes(noise, prompts).score.mean() <= 0.32


def test_robust_to_blur_and_colour_shift():
    prompts = _all("single") + _all("pair")
    images = TF.gaussian_blur(tw.render_batch(prompts, seed=2), 3, 0.8)
    images = (images + torch.tensor([0.06, -0.04, 0.05]).view(1, 3, 1, 1)).clamp(0, 1)
    assert score_shapes(images, prompts).score.mean() >= 0.93


def test_registry_reward_reports_exact_match_in_metadata():
    prompts = ["a small red circle on the left", "a large blue circle on the left"]
    images = tw.render_batch(["a small red circle on the left"] * 2, seed=0)
    metadata = [{}, {}]
    values = rewards.get("shapes_alignment")(images, prompts, metadata)
    torch.testing.assert_close(values, torch.tensor([1.0, 0.5]))
    assert [m["exact_match"] for m in metadata] == [1.0, 0.0]
    assert metadata[1]["color"] == 0.0 and "relation" not in metadata[1]
