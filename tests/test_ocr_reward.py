"""The OCR reward: the target text, the edit distance and the accuracy by hand, and RapidOCR
reading text rendered with PIL."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from diffrl import rewards
from diffrl.rewards import RewardError
from diffrl.rewards.ocr import levenshtein, ocr_accuracy, target_text


def test_the_target_is_the_first_quoted_span_without_spaces_in_lower_case():
    assert target_text('A neon sign that says "Open Late", and "Bar"') == "openlate"
    assert target_text("a mug reading “Good Morning”") == "goodmorning"
    assert target_text("a photo of a cat") is None


@pytest.mark.parametrize(
    "a, b, d",
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "abc", 0), ("flaw", "lawn", 2), ("ab", "ba", 2)],
)
def test_levenshtein_by_hand(a, b, d):
    assert levenshtein(a, b) == levenshtein(b, a) == d


def test_accuracy_by_hand():
    assert ocr_accuracy("OPEN LATE 24h", "openlate") == 1.0  # the target occurs: d = 0
    assert ocr_accuracy("OPEN LATF", "openlate") == pytest.approx(1 - 1 / 8)
    assert ocr_accuracy("", "openlate") == 0.0  # d = 8, capped at |target|
    assert ocr_accuracy("a much longer unrelated text", "bar") == 0.0  # d > |target|: capped


def test_the_reward_reads_each_image_and_refuses_a_prompt_without_quotes():
    seen = []

    def read(image):
        seen.append(image.shape)
        return "OPEN LATE" if image.mean() > 127 else "OPFN"

    reward = rewards.get("ocr", read=read)
    images = torch.stack([torch.ones(3, 8, 12), torch.zeros(3, 8, 12)])
    prompts = ['a sign "open late"', 'a sign "open"']
    torch.testing.assert_close(reward(images, prompts, [{}, {}]), torch.tensor([1.0, 0.75]))
    assert seen == [(8, 12, 3), (8, 12, 3)]
    seen.clear()
    with pytest.raises(RewardError, match="prompt 1 .*quotes no text"):
        reward(images, ['a sign "open"', "a sign"], [{}, {}])
    assert not seen  # refused before reading


def test_rapidocr_reads_rendered_text():
    pytest.importorskip("rapidocr_onnxruntime")
    image = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(image).text((10, 20), "OPEN LATE", fill="black", font=ImageFont.load_default(size=40))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    reward = rewards.get("ocr")
    right, wrong = reward(pixels.repeat(2, 1, 1, 1), ['a sign "Open Late"', 'a sign "Closed"'], [{}, {}])
    assert right == 1.0 and wrong < 0.5
