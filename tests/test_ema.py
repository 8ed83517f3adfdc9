"""The moving average of the trained weights (train.ema, issue #22): its schedule by hand, the swap
in and out, its checkpoint state, and a run whose exported weights and returned pipeline are the
average while its checkpoint keeps the trained weights."""

from pathlib import Path

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffrl.cli import resolve_train_config
from diffrl.ema import EMA, STEPS_KEY
from diffrl.errors import ConfigError, InputFileError
from diffrl.trainer import train
from diffrl.transitions import denoiser

ROOT = Path(__file__).parent.parent
CONFIG = str(ROOT / "configs" / "grpo" / "tiny_geneval.yaml")


def _module(value: float) -> tuple[torch.nn.Module, torch.nn.Parameter]:
    """A module with one trained parameter ``w`` (3 elements) and one frozen one."""
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.full((3,), value))
    module.frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    return module, module.w


def test_the_average_follows_flow_grpos_schedule_by_hand():
    """Start 0, the weights jump to 1 and stay; every 2nd step: n=2, d=3/12 -> 0.75; n=4, d=5/14
    -> 5/14·0.75 + 9/14 = 12.75/14; with decay 0.3 the cap binds from n=4 on (5/14 > 0.3)."""
    module, p = _module(0.0)
    ema = EMA(module, decay=0.9, every=2)
    assert ema.names == ["w"]  # only what is trained
    p.data.fill_(1.0)
    seen = []
    for _ in range(4):
        ema.update()
        seen.append(ema.shadow[0][0].item())
    assert seen == pytest.approx([0.0, 0.75, 0.75, 12.75 / 14])
    capped_module, q = _module(0.0)
    capped = EMA(capped_module, decay=0.3, every=2)
    q.data.fill_(1.0)
    for _ in range(4):
        capped.update()
    assert capped.shadow[0][0].item() == pytest.approx(0.3 * 0.75 + 0.7)  # n=2: d=0.25; n=4: d=0.3


def test_applied_swaps_the_average_in_and_back_and_the_state_round_trips():
    module, p = _module(2.0)
    ema = EMA(module, decay=0.9, every=1)
    p.data.fill_(4.0)
    ema.update()  # d_1 = 2/11
    average = 2.0 * 2 / 11 + 4.0 * 9 / 11
    with ema.applied():
        assert torch.allclose(p.data, torch.full((3,), average))
    assert torch.equal(p.data, torch.full((3,), 4.0))
    state = ema.state_dict()
    assert int(state[STEPS_KEY]) == 1
    again = EMA(_module(9.0)[0], decay=0.9, every=1)
    again.load_state_dict(state, "ema.safetensors")
    assert again.steps == 1 and torch.equal(again.shadow[0], ema.shadow[0])
    with pytest.raises(InputFileError, match=r"ema.safetensors: lacks 1 averaged tensors, e.g. w"):
        again.load_state_dict({STEPS_KEY: torch.tensor(1)}, "ema.safetensors")


def test_ema_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="train.ema_decay"):
        resolve_train_config(CONFIG, ["train.ema_decay=1.0"], None)
    with pytest.raises(ConfigError, match="train.ema_every"):
        resolve_train_config(CONFIG, ["train.ema_every=0"], None)


def test_a_run_exports_and_returns_the_average_and_checkpoints_both(tmp_path):
    overrides = [
        "sample.num_steps=4", "sample.batch_size=8", "train.batch_size=4", "train.gradient_accumulation_steps=1",
        "grpo.group_size=4", "reward.name=jpeg_compressibility", "prompts.source=toy_train_single",
        "run.num_epochs=2", "run.save_freq=100", f"run.output_dir={tmp_path}", "train.ema=true",
        "train.ema_every=1", "train.learning_rate=1e-2",
    ]  # fmt: skip
    pipe = train(resolve_train_config(CONFIG, overrides, None))
    run = tmp_path / "grpo_tiny_geneval"
    checkpoint = run / "checkpoints" / "epoch_0001"
    average, trained = (
        load_file(str(checkpoint / "ema.safetensors")),
        load_file(str(checkpoint / "trainable.safetensors")),
    )
    assert int(average.pop(STEPS_KEY)) == 4  # 2 epochs x 2 optimizer steps
    model = denoiser(pipe)
    held = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert held.keys() == average.keys() == trained.keys()
    assert all(torch.equal(held[n], average[n]) for n in held)
    assert max((average[n] - trained[n]).abs().max().item() for n in held) > 1e-4
    exported = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    expected = get_peft_model_state_dict(model)  # PEFT's key names (diffrl.run.export_weights)
    assert exported.keys() == {f"unet.{k}" for k in expected}
    assert all(torch.equal(exported[f"unet.{k}"], v.float()) for k, v in expected.items())
