"""D3PO from human labels: saved rollouts, the label file and its pairs, the labeling server, and
the whole path driven in headless Chromium (label, kill the server, restart, finish, train)."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from playwright.sync_api import sync_playwright

from diffrl import cli, human
from diffrl.cli import resolve_train_config
from diffrl.config import load_config
from diffrl.errors import ConfigError, InputFileError
from diffrl.files import read_jsonl
from diffrl.labeling import make_server
from diffrl.learner import step_log_prob
from diffrl.trainer import train
from diffrl.types import Text, Trajectory
from tests.browser import launch, needs_chromium

ROOT = Path(__file__).parent.parent
WIN, LOSE, TIE = [1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]


def fake_rollouts(folder: Path, group_sizes=(3, 2)) -> Trajectory:
    """A saved rollout folder of random tensors: groups of the given sizes, 2 steps, 4x4 latents."""
    parents = torch.cat([torch.full((k,), g) for g, k in enumerate(group_sizes)])
    n = parents.shape[0]
    g = torch.Generator().manual_seed(0)
    traj = Trajectory(
        prompts=[f"prompt {int(p)}" for p in parents],
        text=Text(
            torch.randn(n, 3, 8, generator=g),
            torch.randn(n, 5, generator=g),
            torch.randn(n, 3, 8, generator=g),
        ),
        latents=torch.randn(n, 3, 4, 4, 4, generator=g),
        timesteps=torch.tensor([900, 400]),
        log_probs=torch.randn(n, 2, generator=g),
        images=torch.rand(n, 3, 8, 8, generator=g),
        parents=parents,
    )
    human.save_rollouts(folder, traj, torch.arange(n).float(), [{"i": i} for i in range(n)])
    return traj


def write_labels(folder: Path, *records) -> None:
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_saved_rollouts_read_back(tmp_path):
    folder = human.rollout_folder(tmp_path, 3, 0)
    traj = fake_rollouts(folder)
    assert folder == tmp_path / "rollouts" / "epoch_0003" / "rank_0" and human.is_saved(folder)
    back, rewards, metadata = human.load_rollouts(folder)
    for name in ("latents", "log_probs", "timesteps", "parents"):
        assert torch.equal(getattr(back, name), getattr(traj, name)), name
    for got, want in zip(back.text.tensors(), traj.text.tensors()):
        assert (got is None and want is None) or torch.equal(got, want)
    assert back.prompts == traj.prompts and metadata[4] == {"i": 4} and rewards.tolist() == list(range(5))
    assert (back.images - traj.images).abs().max() <= 0.5 / 255 + 1e-6  # PNG keeps uint8 exactly
    groups = human.read_index(folder)["groups"]
    assert [g["members"] for g in groups] == [[0, 1, 2], [3, 4]]
    assert [p.name for p in folder.parent.iterdir()] == ["rank_0"]  # no temporary folder left


def test_label_pairs_best_beats_all_worst_loses_to_all(tmp_path):
    folder = human.rollout_folder(tmp_path, 0, 0)
    traj = fake_rollouts(folder, group_sizes=(3, 2, 2))
    # group 0 = samples 0,1,2: best is position 2 (sample 2), worst position 0 (sample 0);
    # group 1 (samples 3, 4): a tie; group 2 (samples 5, 6): first labeled wrong, then corrected
    write_labels(
        folder,
        {"group": 0, "best": 2, "worst": 0},
        {"group": 1, "tie": True},
        {"group": 2, "best": 0, "worst": 1},
        {"group": 2, "best": 1, "worst": 0},
    )
    pairs = human.label_pairs(traj.parents, folder)
    pair_list = list(zip(pairs.first.tolist(), pairs.second.tolist()))
    assert pair_list == [(0, 1), (0, 2), (1, 2), (3, 4), (5, 6)]
    # (0,1): 0 is worst -> 1 wins; (0,2): 2 best -> 2 wins; (1,2): 2 best -> 2 wins; tie; corrected: 6 wins
    assert pairs.h.tolist() == [LOSE, LOSE, LOSE, TIE, LOSE]
    assert human.unlabeled(folder) == []


def test_middle_images_tie_and_unlabeled_groups_are_reported(tmp_path):
    folder = human.rollout_folder(tmp_path, 0, 0)
    traj = fake_rollouts(folder, group_sizes=(4, 2))
    write_labels(folder, {"group": 0, "best": 0, "worst": 3})
    pairs = human.label_pairs(traj.parents, folder)
    # pairs of group 0: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3); 1 and 2 are middles
    assert pairs.h.tolist()[:6] == [WIN, WIN, WIN, TIE, WIN, WIN]
    assert pairs.h.tolist()[6] == TIE and human.unlabeled(folder) == [1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"group": 5, "tie": True}, "'group' must be an integer in [0, 2)"),
        ({"group": 0, "best": 1, "worst": 1}, "'best' and 'worst' are the same image (1) of group 0"),
        ({"group": 1, "best": 0, "worst": 2}, "'worst' must be an image position in [0, 2) of group 1"),
        ({"group": 0, "best": True, "worst": 0}, "'best' must be an image position"),
    ],
)
def test_bad_label_lines_name_the_file_and_label(tmp_path, bad, message):
    folder = human.rollout_folder(tmp_path, 0, 0)
    fake_rollouts(folder)
    write_labels(folder, {"group": 0, "tie": True}, bad)
    with pytest.raises(InputFileError) as err:
        human.read_labels(folder)
    assert f"{folder / 'labels.jsonl'}: label 2: {message}" in str(err.value)


def test_a_torn_last_label_line_is_skipped(tmp_path):
    folder = human.rollout_folder(tmp_path, 0, 0)
    fake_rollouts(folder)
    (folder / "labels.jsonl").write_text(json.dumps({"group": 1, "tie": True}) + '\n{"group": 0, "be')
    assert human.unlabeled(folder) == [0]


@pytest.fixture
def server(tmp_path):
    run = tmp_path / "run"
    fake_rollouts(human.rollout_folder(run, 0, 0))
    (run / "config.yaml").write_text("secret: 1\n")
    (run / "rollouts" / "link.png").symlink_to(run / "config.yaml")
    srv = make_server(run, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, bytes]:
    """One request with the server's token (``headers`` replace the defaults; ``body`` is JSON
    data, or bytes sent as they are)."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", "X-Diffrl-Token": srv.token}
    conn.request(method, path, body=data, headers={**sent, **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


CHOICE = {"folder": "epoch_0000/rank_0", "group": 0, "tie": True}


@pytest.mark.parametrize(
    "method, path, body, headers, status, message",
    [
        ("GET", "/api/state", None, {"X-Diffrl-Token": ""}, 403, b"token"),
        ("GET", "/", None, {"X-Diffrl-Token": "guess"}, 403, b"token"),
        ("GET", "/files/epoch_0000/rank_0/images/0001.png", None, {"X-Diffrl-Token": ""}, 403, b"token"),
        ("POST", "/api/label", CHOICE, {"X-Diffrl-Token": ""}, 403, b"token"),
        ("POST", "/api/label", CHOICE, {"Content-Type": "text/plain"}, 415, b"application/json"),
        ("POST", "/api/label", CHOICE, {"Origin": "http://evil.example"}, 403, b"cross-origin"),
        ("POST", "/api/label", b"\xff\xfe{}", {}, 400, b"malformed"),
        ("POST", "/api/label", b"[" * 3000 + b"]" * 3000, {"Content-Length": "4000"}, 400, b""),
        ("POST", "/api/label", b"[" * 2000 + b"]" * 2000, {}, 400, b"malformed"),
        ("POST", "/api/label", b"{}", {"Content-Length": "abc"}, 400, b"malformed"),
        ("GET", "/files/a%00b.png", None, {}, 400, b"NUL"),
        ("GET", "/files/%ff%fe.png", None, {}, 400, b"malformed"),
    ],
)
def test_server_refuses_strangers_and_malformed_requests(
    server, method, path, body, headers, status, message
):
    got, answer = request(server, method, path, body, headers)
    assert got == status and message in answer, answer
    assert not (server.run_dir / "rollouts/epoch_0000/rank_0/labels.jsonl").exists()
    assert request(server, "GET", "/api/state")[0] == 200  # and it keeps serving


@pytest.mark.parametrize(
    "path",
    [
        "/files/../config.yaml",
        "/files/epoch_0000/rank_0/../../../config.yaml",
        "/files/%2e%2e/config.yaml",
        "/files/epoch_0000/%2E%2E%2F%2E%2E%2F..%2Fconfig.yaml",
        "/files//etc/passwd",
        "/files/link.png",
    ],
)
def test_server_refuses_paths_outside_the_rollouts(server, path):
    status, body = request(server, "GET", path)
    assert status == 403 and b"secret" not in body


def test_server_serves_images_and_records_choices(server):
    status, body = request(server, "GET", "/files/epoch_0000/rank_0/images/0001.png")
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    status, body = request(server, "GET", "/api/state")
    state = json.loads(body)
    assert (state["labeled"], state["total"], state["next"]["group"]) == (0, 2, 0)
    assert state["next"]["images"][2] == "/files/epoch_0000/rank_0/images/0002.png"
    bad = [
        ({"folder": "epoch_0000/rank_0", "group": 0, "best": 0, "worst": 0}, b"same image"),
        ({"folder": "../../", "group": 0, "tie": True}, b"not a saved rollout folder"),
        ({"folder": "epoch_0000/rank_0", "group": 9, "tie": True}, b"'group' must be"),
    ]
    for choice, message in bad:
        status, body = request(server, "POST", "/api/label", choice)
        assert status == 400 and message in body
    status, body = request(
        server, "POST", "/api/label", {"folder": "epoch_0000/rank_0", "group": 0, "best": 2, "worst": 1}
    )
    assert status == 200 and json.loads(body)["next"]["group"] == 1
    records = [
        json.loads(line) for line in (server.run_dir / "rollouts/epoch_0000/rank_0/labels.jsonl").open()
    ]
    assert [(r["group"], r["best"], r["worst"]) for r in records] == [(0, 2, 1)]


ATTACK = """<!doctype html><title>another site</title><script>
const target = "TARGET";
const label = JSON.stringify({folder: "epoch_0000/rank_0", group: 0, tie: true});
window.results = Promise.allSettled([
  fetch(target + "/api/label", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: label}),
  fetch(target + "/api/label", {method: "POST", headers: {"Content-Type": "application/json"}, body: label}),
  fetch(target + "/api/state").then((r) => r.text()),
]).then((all) => all.map((r) => r.status));
</script>"""


@needs_chromium
def test_another_site_cannot_label_but_the_page_can(server):
    """A page from another origin (another port) posts labels the ways a browser allows it to,
    and reads the state; nothing is written and nothing is read. The page itself then labels."""
    import http.server

    host, port = server.server_address[:2]
    target = f"http://{host}:{port}"
    page_bytes = ATTACK.replace("TARGET", target).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page_bytes)

        def log_message(self, *args):
            pass

    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    labels = server.run_dir / "rollouts/epoch_0000/rank_0/labels.jsonl"
    try:
        with sync_playwright() as p:
            browser = launch(p)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
                outcomes = page.evaluate("window.results")
                assert outcomes[1] == "rejected" and outcomes[2] == "rejected", outcomes  # CORS blocks
                assert not labels.exists(), labels.read_text()  # the no-cors POST reached, and was refused
                page.goto(f"{target}/?token={server.token}")
                page.wait_for_function("document.getElementById('progress').textContent.startsWith('0 of ')")
                page.keyboard.press("t")
                page.wait_for_function("document.getElementById('progress').textContent.startsWith('1 of ')")
            finally:
                browser.close()
    finally:
        attacker.shutdown()
        attacker.server_close()
    assert [r.get("tie") for r in read_jsonl(labels, strict=True)] == [True]


def test_label_command_needs_saved_rollouts(tmp_path, capsys):
    assert cli.main(["label", str(tmp_path), "--port", "0"]) == 2
    assert "no saved rollouts" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end, headless Chromium


def start_label_server(run_dir: Path) -> tuple[subprocess.Popen, str]:
    """``diffrl label RUN_DIR --port 0`` in its own process; returns it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffrl.cli", "label", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline()
    assert line.startswith("diffrl label: http://127.0.0.1:") and "/?token=" in line, line
    return proc, line.split()[2]


def wait_progress(page, labeled: int) -> None:
    page.wait_for_function(
        f"document.getElementById('progress').textContent.startsWith('{labeled} of ')", timeout=20_000
    )


@pytest.mark.slow
@needs_chromium
def test_label_page_end_to_end_then_train_from_the_labels(tmp_path):
    config = str(ROOT / "configs" / "d3po" / "tiny_human.yaml")
    overrides = [f"run.output_dir={tmp_path}", "run.num_epochs=1", "sample.batch_size=4"]
    assert cli.main(["train", config, *overrides]) == 3  # sampled epoch 0, waits for labels
    run_dir = tmp_path / "d3po_tiny_human"
    folder = human.rollout_folder(run_dir, 0, 0)
    assert human.is_saved(folder) and human.unlabeled(folder) == [0, 1, 2, 3]

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        proc, url = start_label_server(run_dir)
        try:
            page.goto(url)
            wait_progress(page, 0)
            page.wait_for_function(
                "document.images.length > 0 && [...document.images].every(i => i.complete)", timeout=20_000
            )
            assert page.evaluate("[...document.images].map(i => i.naturalWidth)") == [32, 32]  # loaded
            page.click("figure[data-index='1']")  # group 0: image 2 is best, so image 1 is worst
            wait_progress(page, 1)
            page.keyboard.press("1")  # group 1: image 1 is best
            wait_progress(page, 2)
            proc.send_signal(signal.SIGKILL)  # the server dies mid-way
            proc.wait(timeout=10)
            assert len(read_jsonl(folder / "labels.jsonl", strict=True)) == 2  # both choices on disk
            proc, url = start_label_server(run_dir)
            page.goto(url)
            wait_progress(page, 2)  # resumes at the first unlabeled group
            assert page.text_content("#where").endswith("group 2")
            page.keyboard.press("t")  # group 2: a tie
            wait_progress(page, 3)
            page.click("figure[data-index='0']")  # group 3: image 1 is best
            wait_progress(page, 4)
            assert page.is_visible("#done") and not page.is_visible("#task")
        finally:
            proc.kill()
            browser.close()

    labels = human.read_labels(folder)
    assert [(g, r.get("best"), r.get("tie")) for g, r in sorted(labels.items())] == [
        (0, 1, None),
        (1, 0, None),
        (2, None, True),
        (3, 0, None),
    ]
    pipe = train(resolve_train_config(None, [], str(run_dir)))  # resumes: trains epoch 0 from the labels
    record = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert (record["epoch"], record["num_pairs"], record["num_trained"]) == (0, 4, 3)

    # the policy now prefers each labeled winner's chain over its loser's more than the sampler did
    traj, _, _ = human.load_rollouts(folder)
    data = traj
    winners, losers = torch.tensor([1, 2, 6]), torch.tensor([0, 3, 7])
    steps = torch.arange(data.log_probs.shape[1])
    run_config = resolve_train_config(None, [], str(run_dir))
    gains = []
    with torch.no_grad():
        for members in (winners, losers):
            idx, step = members.repeat_interleave(len(steps)), steps.repeat(len(members))
            now = step_log_prob(pipe.unet, pipe, data, idx, step, run_config, Accelerator(cpu=True))
            gains.append((now - data.log_probs[idx, step]).mean())
    print("log-prob gain of winners, losers:", [g.item() for g in gains])
    assert gains[0] > gains[1], gains


def test_extra_rewards_are_refused_with_human_labels():
    with pytest.raises(ConfigError, match=r"d3po.extra_rewards: only used with preferences: reward"):
        load_config(str(ROOT / "configs/d3po/tiny_human.yaml"), ["d3po.extra_rewards=[jpeg_compressibility]"])
