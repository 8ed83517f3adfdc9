"""``diffrl label RUN_DIR``: a local page for labeling a D3PO run's saved rollouts.

The page (``diffrl/assets/label.html``) shows the first unlabeled group of the run (its prompt and
images); the user picks the best and the worst image, or marks a tie, with the mouse or the number
keys. Each choice is appended at once to the rollout folder's ``labels.jsonl``
(:mod:`diffrl.human`), so nothing is lost when the server or the browser dies, and a restarted
server resumes at the first group still unlabeled.

The server makes a secret token at start; ``diffrl label`` prints the page's URL with it, and
every request must carry it (see :class:`LabelHandler`), so that other sites open in the same
browser cannot read the images or write labels.

Routes: ``GET /`` the page; ``GET /api/state`` progress and the next group; ``POST /api/label``
one choice ``{"folder", "group", "best", "worst"}`` or ``{"folder", "group", "tie": true}``,
answered with the new state; ``GET /files/<path>`` a file under ``RUN_DIR/rollouts`` (anything
resolving outside it, ``..`` or a symlink, is refused with 403).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import mimetypes
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from diffrl import human
from diffrl.errors import InputFileError
from diffrl.files import append_jsonl

MAX_BODY = 4096


def label_state(run_dir: Path) -> dict:
    """Progress over every saved rollout folder and the first unlabeled group (None when done)."""
    root, labeled, total, upcoming = run_dir / "rollouts", 0, 0, None
    for folder in human.rollout_folders(run_dir):
        index, missing = human.read_index(folder), human.unlabeled(folder)
        total += len(index["groups"])
        labeled += len(index["groups"]) - len(missing)
        if missing and upcoming is None:
            rel = folder.relative_to(root).as_posix()
            group = index["groups"][missing[0]]
            upcoming = {
                "folder": rel,
                "epoch": int(folder.parent.name.split("_")[1]),
                "group": group["group"],
                "prompt": group["prompt"],
                "images": [f"/files/{rel}/{image}" for image in group["images"]],
            }
    return {"run": str(run_dir), "labeled": labeled, "total": total, "next": upcoming}


def add_label(run_dir: Path, body: dict) -> None:
    """Validate one choice from the page and append it to its folder's labels.jsonl.

    Raises :class:`InputFileError` (answered with 400) for an unknown folder or a bad choice."""
    folders = {f.relative_to(run_dir / "rollouts").as_posix(): f for f in human.rollout_folders(run_dir)}
    folder = folders.get(body.get("folder"))
    if folder is None:
        raise InputFileError(f"'folder' {body.get('folder')!r} is not a saved rollout folder of {run_dir}")
    record = {"group": body.get("group")}
    record.update(
        {"tie": True} if body.get("tie") is True else {"best": body.get("best"), "worst": body.get("worst")}
    )
    problem = human.check_label(record, human.read_index(folder)["groups"])
    if problem:
        raise InputFileError(problem)
    append_jsonl(folder / "labels.jsonl", {**record, "time": round(time.time(), 3)})


def inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` if it is an existing file that resolves inside ``root``, else None."""
    root = root.resolve()
    path = (root / relative).resolve()
    return path if path.is_relative_to(root) and path.is_file() else None


class LabelHandler(BaseHTTPRequestHandler):
    """The routes of the module docstring; ``self.server.run_dir`` is the run folder.

    Every request must carry the server's token (``?token=`` or the ``X-Diffrl-Token`` header):
    another site open in the same browser cannot read the page that holds it, so it can neither
    fetch the run's images nor post labels. A label POST must also be ``application/json`` (a
    type a cross-origin page cannot send without a preflight, which is never answered) and, when
    the browser names its Origin, come from this server's own. Malformed requests get a 400."""

    server_version = "diffrl-label"
    timeout = 30  # seconds a client may take to send its request (a stalled one frees its thread)

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _guarded(self, route) -> None:
        """Run ``route``; a malformed request (bad encoding, NUL bytes, nesting) answers 400 and
        an unexpected fault 500, each with a one-line JSON error and no traceback."""
        try:
            url = urlsplit(self.path)
            path = unquote(url.path, errors="strict")
            if "\x00" in path:
                raise ValueError("the path holds a NUL byte")
            token = parse_qs(url.query).get("token", [""])[0] or self.headers.get("X-Diffrl-Token", "")
            if not hmac.compare_digest(token.encode(), self.server.token.encode()):
                self._json(403, {"error": "missing or wrong token: open the URL that diffrl label printed"})
                return
            route(path)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError included
            self._json(400, {"error": f"malformed request: {type(err).__name__}: {str(err)[:200]}"})
        except OSError:  # the client went away or stalled
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - the server must keep serving; one line, no traceback
            self._json(500, {"error": f"{type(err).__name__}: {str(err)[:200]}"})

    def _get(self, path: str) -> None:
        if path in ("/", "/index.html"):
            page = files("diffrl").joinpath("assets/label.html").read_bytes()
            self._send(200, page, "text/html; charset=utf-8")
        elif path == "/api/state":
            try:
                self._json(200, label_state(self.server.run_dir))
            except InputFileError as err:  # a labels file edited by hand into something unreadable
                self._json(500, {"error": str(err)})
        elif path.startswith("/files/"):
            target = inside(self.server.run_dir / "rollouts", path[len("/files/") :])
            if target is None:
                self._json(403, {"error": f"{path}: not a file inside the run's rollouts folder"})
            else:
                kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                self._send(200, target.read_bytes(), kind)
        else:
            self._json(404, {"error": f"{path}: no such page"})

    def _post(self, path: str) -> None:
        if path != "/api/label":
            self._json(404, {"error": f"{path}: no such endpoint"})
            return
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            self._json(415, {"error": f"a label is sent as application/json, not {kind or 'no type'}"})
            return
        origin, host = self.headers.get("Origin"), self.headers.get("Host", "")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
            self._json(403, {"error": f"cross-origin request from {origin[:100]} refused"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self._json(400, {"error": f"a label is a JSON object of at most {MAX_BODY} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
            if not isinstance(body, dict):
                raise InputFileError("a label must be a JSON object")
            with self.server.lock:
                add_label(self.server.run_dir, body)
                state = label_state(self.server.run_dir)
        except InputFileError as err:
            self._json(400, {"error": str(err)})
            return
        self._json(200, state)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")  # the page's URL holds the token
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # quiet: one line per request is noise here
        pass


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """The labeling server for ``run_dir`` (not started; port 0 picks a free port).

    Raises :class:`InputFileError` when the run has no saved rollouts."""
    run_dir = Path(run_dir).resolve()
    if not human.rollout_folders(run_dir):
        raise InputFileError(
            f"{run_dir / 'rollouts'}: no saved rollouts (train with algorithm: d3po, d3po.preferences: human)"
        )
    server = ThreadingHTTPServer((host, port), LabelHandler)
    server.run_dir, server.lock, server.token = run_dir, threading.Lock(), secrets.token_urlsafe(18)
    return server


def page_url(server: ThreadingHTTPServer) -> str:
    """The page's address, with the server's token (the only way in)."""
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/?token={server.token}"
