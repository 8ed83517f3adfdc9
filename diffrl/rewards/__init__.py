"""Reward registry. A reward is a plain callable ``(images, prompts, metadata) -> Tensor[B]``.

``images`` are float ``[B, 3, H, W]`` in [0, 1], ``prompts`` a list of B strings, ``metadata`` a
list of B dicts (may be empty dicts). Built-ins are named (``jpeg_compressibility``, ``aesthetic``,
...); a custom reward is named by its import path ``package.module:function``. With keyword
arguments the imported object is treated as a factory and called with them to make the reward
(keywords it does not take are refused before it runs). A reward may set ``min_size``: the
smallest image side, in pixels, it can judge (checked against ``sample.resolution`` before a run
loads its model). Rewards get a copy of the images, so they may modify them.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import warnings
from collections.abc import Callable

import torch

from diffrl.errors import RewardError
from diffrl.rewards.clip import aesthetic, clip_score
from diffrl.rewards.combined import ensemble, weighted
from diffrl.rewards.geneval_detector import geneval_reward
from diffrl.rewards.hps import hpsv2
from diffrl.rewards.imagereward import image_reward
from diffrl.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from diffrl.rewards.ocr import ocr
from diffrl.rewards.pickscore import pickscore
from diffrl.rewards.proxy import proxy
from diffrl.rewards.remote import remote
from diffrl.rewards.shapes import shapes_alignment, toy_geneval

RewardFn = Callable[[torch.Tensor, list, list], torch.Tensor]

REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "aesthetic": aesthetic,
    "clip_score": clip_score,
    "pickscore": pickscore,
    "hpsv2": hpsv2,
    "imagereward": image_reward,
    "ocr": ocr,
    "geneval": geneval_reward,
    "remote": remote,
    "weighted": weighted,
    "ensemble": ensemble,
    "proxy": proxy,
    "shapes_alignment": shapes_alignment,
    "toy_geneval": toy_geneval,
}
"""Built-in reward factories by name."""


def check_rewards(name: str, values, batch_size: int) -> torch.Tensor:
    """Validate a reward's output; returns it as float32 ``[B]`` on CPU or raises :class:`RewardError`.

    Non-finite values raise an error whose ``indices`` are the bad samples and whose ``values``
    hold the whole batch, so that :func:`score` can drop just those samples.
    """
    if not isinstance(values, torch.Tensor):
        raise RewardError(
            f"reward {name!r} returned {type(values).__name__}, expected a torch.Tensor of shape [{batch_size}]"
        )
    if tuple(values.shape) != (batch_size,):
        raise RewardError(f"reward {name!r} returned shape {tuple(values.shape)}, expected ({batch_size},)")
    if values.is_complex() or values.dtype == torch.bool:
        raise RewardError(f"reward {name!r} returned dtype {values.dtype}, expected a real floating tensor")
    values = values.detach().cpu()
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(
            f"reward {name!r} returned non-finite values at sample indices {bad}",
            indices=bad,
            values=values.float(),
        )
    big = (values.double().abs() > torch.finfo(torch.float32).max).nonzero().flatten().tolist()
    if big:
        raise RewardError(
            f"reward {name!r} returned values beyond float32's range (|r| > 3.4e38) at sample indices {big}",
            indices=big,
            values=values.double().clamp(-3e38, 3e38).float(),
        )
    return values.float()


def _import(path: str):
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise RewardError(
            f"reward {path!r}: cannot import {attr!r} from module {module_name!r} ({err})"
        ) from err


def get(name: str, **kwargs) -> RewardFn:
    """The reward named ``name`` (a built-in or ``package.module:function``), with output checks.

    The returned callable raises :class:`RewardError` naming the reward when the output is not a
    finite ``[B]`` tensor.
    """
    if name in REGISTRY:
        fn = _make(name, REGISTRY[name], kwargs)
    elif ":" in name:
        fn = _import(name)
        fn = _make(name, fn, kwargs) if kwargs else fn
    else:
        raise RewardError(
            f"unknown reward {name!r}; built-ins: {', '.join(REGISTRY)}; or give 'package.module:function'"
        )
    if not callable(fn):
        raise RewardError(f"reward {name!r} is not callable")

    def checked(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        # a copy: a reward that edits its input in place cannot change the saved images
        return check_rewards(name, fn(images.clone(), list(prompts), metadata), images.shape[0])

    checked.__name__ = name
    checked.min_size = int(getattr(fn, "min_size", 1))
    return checked


def _make(name: str, factory: Callable, kwargs: dict):
    """``factory(**kwargs)``, after checking that it takes those keywords (the error names them
    and what it takes, before anything is built)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return factory(**kwargs)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        takes = ", ".join(
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        raise RewardError(
            f"reward.kwargs: reward {name!r} does not take {sorted(kwargs)} ({err}; it takes: {takes or 'nothing'})"
        ) from err
    return factory(**kwargs)


def _call_with_timeout(fn: Callable, args: tuple, timeout: float | None):
    """``fn(*args)``, raising ``TimeoutError`` after ``timeout`` seconds. The call runs in a daemon
    thread that is abandoned on timeout (Python cannot stop a thread; it finishes in the background)."""
    if timeout is None:
        return fn(*args)
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="diffrl-reward")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no result after {timeout:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def score(
    reward_fn: RewardFn,
    images: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    *,
    timeout: float | None = None,
    on_error: str = "fail",
    first_index: int = 0,
    where: str = "",
) -> torch.Tensor:
    """Rewards of a batch with the faults of the reward contained (``reward.timeout``, ``reward.on_error``).

    A reward that raises, exceeds ``timeout`` seconds, or returns the wrong type or shape fails the
    whole batch; non-finite values fail their samples. With ``on_error="fail"`` a
    :class:`RewardError` names the reward, ``where`` (e.g. ``"epoch 3"``) and the failed sample
    indices (counted from ``first_index``); with ``"drop"`` the failed samples get NaN and a
    warning says the same.

    Returns:
        ``[B]`` float32; NaN marks dropped samples.
    """
    name = getattr(reward_fn, "__name__", "reward")
    batch = images.shape[0]
    at = f" ({where})" if where else ""
    try:
        return _call_with_timeout(reward_fn, (images, prompts, metadata), timeout)
    except RewardError as err:
        if err.values is None:
            failed, values, message = list(range(batch)), torch.full((batch,), float("nan")), str(err)
        else:
            failed, values = err.indices, err.values.clone()
            values[failed] = float("nan")
            message = f"reward {name!r} returned non-finite values"
    except Exception as err:
        failed, values = list(range(batch)), torch.full((batch,), float("nan"))
        cause = "timed out" if isinstance(err, TimeoutError) else "raised"
        message = f"reward {name!r} {cause} {type(err).__name__}: {err}"
    indices = [first_index + i for i in failed]
    if on_error == "fail":
        raise RewardError(
            f"{message} on sample indices {indices}{at}; set reward.on_error=drop to drop such samples",
            indices=indices,
        )
    warnings.warn(f"{message} on sample indices {indices}{at}; dropped", RuntimeWarning, stacklevel=2)
    return values


__all__ = [
    "REGISTRY",
    "RewardError",
    "RewardFn",
    "check_rewards",
    "get",
    "score",
    "aesthetic",
    "clip_score",
    "jpeg_compressibility",
    "jpeg_incompressibility",
]
