"""The reward server (issue #24): the npz protocol, real server processes on 127.0.0.1 (round
trip against the local reward, concurrent clients, a server killed mid-request and restarted, the
token), and non-finite rewards coming back as dropped samples."""

import io
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from diffrl import rewards
from diffrl.errors import ConfigError, RewardError
from diffrl.prompts import load_prompts
from diffrl.rewards.remote import decode_request, encode_request, make_server

START = "import sys; from diffrl.cli import main; sys.exit(main(sys.argv[1:]))"


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Images on exact 8-bit levels, so that the wire's 8 bits lose nothing."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A reward module the server processes import: brightness, slowed down by ``delay`` seconds,
    NaN for images whose prompt says so."""
    (tmp_path / "served.py").write_text(
        textwrap.dedent(
            """
            import time, torch

            def make(delay=0.0):
                def reward(images, prompts, metadata):
                    time.sleep(delay)
                    for m in metadata:
                        m["seen"] = True
                    values = images.mean(dim=(1, 2, 3))
                    return torch.where(torch.tensor(["nan" in p for p in prompts]), float("nan"), values)
                return reward
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "served:make"


def _serve(name: str, port: int, *kwargs: str, token: str | None = None) -> subprocess.Popen:
    """``diffrl serve-reward`` in its own process, returned once it listens."""
    args = [sys.executable, "-c", START, "serve-reward", name, *kwargs, "--port", str(port)]
    args += ["--token", token] if token else []
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()  # printed once the reward is built and the socket listens
    assert f"127.0.0.1:{port}" in line, line + process.stdout.read()
    return process


def test_the_request_round_trips_and_pickles_are_refused():
    images, prompts, metadata = _images(2), ["a", "b"], [{"k": 1}, {}]
    back = decode_request(encode_request(images, prompts, metadata))
    torch.testing.assert_close(back[0], images, rtol=0, atol=0)
    assert back[1:] == (prompts, metadata)
    buffer = io.BytesIO()
    np.savez(buffer, images=np.array([object()], dtype=object), request=np.zeros(2, np.uint8))
    with pytest.raises(ValueError):
        decode_request(buffer.getvalue())


def test_a_served_reward_equals_the_local_one_for_concurrent_clients(plugin):
    port = _free_port()
    server = _serve("shapes_alignment", port)
    try:
        local = rewards.get("shapes_alignment")
        client = rewards.get("remote", url=f"http://127.0.0.1:{port}")
        prompts = load_prompts("toy_heldout_all").prompts[:3]
        results, errors = {}, []

        def call(seed):
            try:
                metadata = [{} for _ in prompts]
                results[seed] = (client(_images(3, seed), prompts, metadata), metadata)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=call, args=(seed,)) for seed in range(4)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert not errors and sorted(results) == [0, 1, 2, 3]
        for seed, (values, metadata) in results.items():
            want_meta = [{} for _ in prompts]
            torch.testing.assert_close(values, local(_images(3, seed), prompts, want_meta))
            assert metadata == want_meta  # what the served reward wrote came back
    finally:
        server.kill()


def test_a_server_killed_mid_request_and_restarted_loses_no_sample(plugin):
    port = _free_port()
    first = _serve(plugin, port, "delay=1.5")
    client = rewards.get("remote", url=f"http://127.0.0.1:{port}", timeout=10.0, retries=8, backoff=0.5)
    outcome = {}

    def call():
        outcome["values"] = client(_images(2), ["x", "y"], [{}, {}])

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.7)  # the request is in the server's reward call
    first.kill()
    first.wait(10)
    second = _serve(plugin, port, "delay=0.1")
    try:
        thread.join(60)
        assert not thread.is_alive() and "values" in outcome
        torch.testing.assert_close(outcome["values"], _images(2).mean(dim=(1, 2, 3)))
    finally:
        second.kill()
    with pytest.raises(RewardError, match=rf"127.0.0.1:{port}.*after 2 attempts"):  # nothing listens: bounded
        rewards.get("remote", url=f"http://127.0.0.1:{port}", retries=1, backoff=0.1)(_images(1), ["x"], [{}])


def test_the_token_and_non_finite_rewards(plugin):
    port = _free_port()
    server = _serve(plugin, port, "delay=0", token="s3cret")
    try:
        with pytest.raises(RewardError, match="HTTP 401.*after 1 attempts"):  # a 4xx is not retried
            rewards.get("remote", url=f"http://127.0.0.1:{port}")(_images(1), ["x"], [{}])
        client = rewards.get("remote", url=f"http://127.0.0.1:{port}", token="s3cret")
        metadata = [{}, {}]
        with pytest.raises(RewardError, match="non-finite values at sample indices \\[1\\]") as caught:
            client(
                _images(2), ["ok", "nan please"], metadata
            )  # the sample is dropped, as a local one would be
        assert caught.value.indices == [1] and caught.value.values[0] == _images(2)[0].mean()
        assert metadata == [{"seen": True}, {"seen": True}]
    finally:
        server.kill()
    with pytest.raises(ConfigError, match="needs --token"):
        make_server(lambda *a: None, "x", host="0.0.0.0")
