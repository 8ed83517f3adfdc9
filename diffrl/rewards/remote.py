"""Rewards served over HTTP: ``diffrl serve-reward NAME`` runs any registered reward in its own
process (its own dependencies, its own GPU), and ``reward.name: remote`` calls it from a run.

Protocol (version 1), loopback by default, a bearer token required when bound elsewhere:

* ``GET /health`` -> ``{"status": "ok", "reward": NAME, "requests": N}``
* ``POST /score`` with an ``.npz`` body (``numpy.load(allow_pickle=False)``: never pickle):
  ``images`` uint8 ``[B, H, W, 3]`` (8-bit, as a PNG would carry them) and ``request``, the
  UTF-8 JSON ``{"prompts": [...], "metadata": [...]}`` as a uint8 array -> ``{"rewards": [B
  floats, null for non-finite], "metadata": [B dicts the reward wrote]}``; a reward that raises
  answers 500 ``{"error": ...}``.

One server serves several trainers: requests are handled on threads and the reward is called
under a lock, one batch at a time. The client retries connection failures, timeouts and 5xx
answers with a growing pause, then raises :class:`~diffrl.errors.RewardError` so that the run's
``reward.on_error`` decides (fail, or drop the batch's samples); a run overlaps its reward calls
with the next batch's sampling (:mod:`diffrl.collect`), remote or not.
"""

from __future__ import annotations

import hmac
import io
import json
import math
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from diffrl.errors import ConfigError, RewardError

MAX_BODY = 1 << 30
"""Largest request body the server reads (1 GiB)."""


def encode_request(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> bytes:
    """``images [B, 3, H, W]`` in [0, 1] as 8-bit ``[B, H, W, 3]`` and the JSON request, in one npz."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    request = json.dumps({"prompts": list(prompts), "metadata": metadata}).encode()
    buffer = io.BytesIO()
    np.savez(buffer, images=pixels, request=np.frombuffer(request, dtype=np.uint8))
    return buffer.getvalue()


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The inverse of :func:`encode_request`: float images ``[B, 3, H, W]`` in [0, 1], prompts,
    metadata; ``ValueError`` on anything else (pickled objects are refused by numpy)."""
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        pixels, request = data["images"], json.loads(data["request"].tobytes().decode())
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    prompts, metadata = request["prompts"], request["metadata"]
    if len(prompts) != len(pixels) or len(metadata) != len(pixels):
        raise ValueError(f"{len(pixels)} images, {len(prompts)} prompts, {len(metadata)} metadata")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, prompts, metadata


def make_server(reward_fn, name: str, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
    """A :class:`ThreadingHTTPServer` serving ``reward_fn`` (not started: call ``serve_forever``);
    ``port`` 0 picks a free one (``server.server_address``). Bound beyond loopback it needs a token."""
    from diffrl.labeling import is_loopback  # the labeling server's rule; imported here: it imports rewards

    if not is_loopback(host) and not token:
        raise ConfigError(
            f"--host {host}: serving beyond loopback needs --token (clients send it as a bearer token)"
        )
    lock, counter = threading.Lock(), {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002  (the stdlib's name) - quiet by default
            pass

        def answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def authorized(self) -> bool:
            if not token:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return True
            self.answer(401, {"error": "missing or wrong bearer token"})
            return False

        def do_GET(self):  # noqa: N802  (http.server's name)
            if not self.authorized():
                return
            if self.path != "/health":
                return self.answer(404, {"error": f"no such endpoint {self.path}"})
            self.answer(200, {"status": "ok", "reward": name, "requests": counter["requests"]})

        def do_POST(self):  # noqa: N802
            if not self.authorized():
                return
            if self.path != "/score":
                return self.answer(404, {"error": f"no such endpoint {self.path}"})
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                return self.answer(413, {"error": f"body of {length} bytes (1..{MAX_BODY})"})
            try:
                images, prompts, metadata = decode_request(self.rfile.read(length))
            except (ValueError, KeyError, OSError) as err:
                return self.answer(400, {"error": f"bad request: {err}"})
            try:
                with lock:
                    counter["requests"] += 1
                    values = reward_fn(images, prompts, metadata)
            except RewardError as err:
                if err.values is None:
                    return self.answer(500, {"error": str(err)})
                values = err.values.clone()  # non-finite or out-of-range values: null, dropped by the client
                values[err.indices] = float("nan")
            except Exception as err:  # reported to the client, which applies reward.on_error
                return self.answer(500, {"error": f"{type(err).__name__}: {err}"})
            rewards = [v if math.isfinite(v) else None for v in values.tolist()]
            self.answer(200, {"rewards": rewards, "metadata": metadata})

    return ThreadingHTTPServer((host, port), Handler)


def remote(
    url: str, token: str | None = None, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0
):
    """Reward factory: the reward served at ``url`` (``http://HOST:PORT``) by ``diffrl serve-reward``.

    Each call POSTs the batch to ``/score`` with ``timeout`` seconds per attempt; a refused
    connection, a timeout or a 5xx answer is retried ``retries`` times after ``backoff``,
    ``2·backoff``, ... seconds; then, or on a 4xx answer, it raises :class:`RewardError` naming the
    server and its answer. Metadata the served reward wrote is copied into ``metadata``.

    Returns ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> [B]`` float32 (NaN where the
    server's reward was not finite).
    """
    base = url.rstrip("/")
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def post(body: bytes) -> dict:
        last = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{base}/score", data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:500]
                last = f"HTTP {err.code}: {detail}"
                if err.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise RewardError(f"reward server {base}: {last} (after {attempt + 1} attempts)")

    def reward(images, prompts, metadata):
        answer = post(encode_request(images, prompts, metadata))
        for mine, theirs in zip(metadata, answer["metadata"]):
            mine.update(theirs)
        return torch.tensor(
            [float("nan") if v is None else v for v in answer["rewards"]], dtype=torch.float32
        )

    return reward


__all__ = ["decode_request", "encode_request", "make_server", "remote"]
