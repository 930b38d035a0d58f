"""Real HTTP servers on 127.0.0.1 for the remote-source tests and benchmarks/bench_remote.py, and tests of
the servers themselves (a wrong test server would make every remote test meaningless).

- `serve_directory(root)`: static files with HTTP Range support (206 / 416, ETag, Last-Modified,
  Content-Length), like a CDN or an object store.
- `serve_hub(root, token)`: the Hugging Face Hub's `/{org}/{name}/resolve/{revision}/{file}` URLs over a
  directory: a bearer token is required, and .safetensors files redirect (302) to a second server (another
  origin, like the Hub's CDN) that records whether any request carried an Authorization header.
- `Faults`: seeded, bounded 503 answers and connections dropped mid-body, for either server.

Every request is logged (method, path, byte range, status, body bytes sent), so tests can count what was
fetched. Threads of this process serve; the CLI under test runs in a subprocess.
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
import re
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclasses.dataclass
class Request:
    server: str
    method: str
    path: str  # URL path, unquoted, without the query
    range: tuple[int, int] | None  # inclusive byte range served (206), None for a whole answer
    status: int
    sent: int  # body bytes actually sent
    authorization: str | None


class Faults:
    """Seeded random faults on GETs of weight files: 503 answers and bodies cut halfway. Bounded: at most
    `limit` in all and never two in a row for one path, so a client with a few retries always gets through."""

    def __init__(self, seed: int = 0, p503: float = 0.2, pdrop: float = 0.2, limit: int = 40):
        self.random = random.Random(seed)
        self.p503, self.pdrop, self.left = p503, pdrop, limit
        self.last_faulted: set[str] = set()
        self.lock = threading.Lock()
        self.count = {"503": 0, "drop": 0}

    def pick(self, path: str) -> str | None:
        with self.lock:
            if path in self.last_faulted or self.left <= 0 or not path.endswith(".safetensors"):
                self.last_faulted.discard(path)
                return None
            x = self.random.random()
            kind = "503" if x < self.p503 else "drop" if x < self.p503 + self.pdrop else None
            if kind:
                self.left -= 1
                self.count[kind] += 1
                self.last_faulted.add(path)
            return kind


class Server:
    """A running ThreadingHTTPServer: `url`, the request `log`, and hooks the handler consults."""

    def __init__(self, handler, name: str, **hooks):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.name = name
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.log: list[Request] = []
        self.lock = threading.Lock()
        self.root: Path = hooks.pop("root")
        self.faults: Faults | None = hooks.pop("faults", None)
        self.etag_changes: dict[str, int] = {}  # path -> after this many GETs of it, the ETag changes
        self.gets: dict[str, int] = {}
        self.down_after: int | None = None  # GETs of weight files after this many all get 503 (an outage)
        self.weight_gets = 0
        self.hooks = hooks
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def record(self, request: Request) -> None:
        with self.lock:
            self.log.append(request)

    def requests(self, method: str = "GET", suffix: str = "") -> list[Request]:
        with self.lock:
            return [r for r in self.log if r.method == method and r.path.endswith(suffix)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RangeHandler(BaseHTTPRequestHandler):
    """Serves `server.root` with single-range support; `route()` maps a URL path to a file."""

    protocol_version = "HTTP/1.1"  # keep-alive, like real servers

    def log_message(self, *args):  # quiet
        pass

    @property
    def owner(self) -> Server:
        return self.server.owner

    def route(self, path: str) -> Path | None:
        return self.owner.root / path.lstrip("/")

    def do_HEAD(self):
        self.serve(head=True)

    def do_GET(self):
        self.serve(head=False)

    def serve(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if not self.allowed(path):
            return
        file = self.route(path)
        if file is None or not file.is_file():
            return self.answer(path, 404, b"not found\n")
        if self.redirected(path, file):
            return
        owner = self.owner
        if not head:
            down = False
            with owner.lock:
                owner.gets[path] = owner.gets.get(path, 0) + 1
                gets = owner.gets[path]
                if path.endswith(".safetensors"):
                    owner.weight_gets += 1
                    down = owner.down_after is not None and owner.weight_gets > owner.down_after
            if down:
                return self.answer(path, 503, b"down\n")
            fault = owner.faults.pick(path) if owner.faults else None
            if fault == "503":
                return self.answer(path, 503, b"try again\n", {"Retry-After": "0"})
        else:
            gets, fault = owner.gets.get(path, 0), None
        st = file.stat()
        size = st.st_size
        changed = path in owner.etag_changes and gets > owner.etag_changes[path]
        headers = {"ETag": f'"{st.st_mtime_ns:x}-{size:x}{"-new" if changed else ""}"',
                   "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True), "Accept-Ranges": "bytes"}
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        match = _RANGE.match(wanted or "")
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(size - 1, int(match.group(2))) if match.group(2) else size - 1
            else:  # a suffix: the last N bytes
                start = max(0, size - int(match.group(2)))
            if start >= size or end < start:
                headers["Content-Range"] = f"bytes */{size}"
                return self.answer(path, 416, b"", headers)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(length)}.items():
            self.send_header(k, v)
        self.end_headers()
        # logged before the body goes: a client that has its bytes always finds its request in the log
        request = Request(owner.name, "HEAD" if head else "GET", path, (start, end) if status == 206 else None,
                          status, 0, self.headers.get("Authorization"))
        owner.record(request)
        sent = 0
        if not head and length:
            cut = length // 2 if fault == "drop" else length
            with open(file, "rb") as f:
                try:
                    sent = self.connection.sendfile(f, start, cut) if cut else 0
                except OSError:
                    pass
            if fault == "drop":  # the body stops halfway: the connection goes, as a dropped one does
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        request.sent = sent

    def allowed(self, path: str) -> bool:
        return True

    def redirected(self, path: str, file: Path) -> bool:
        return False

    def answer(self, path: str, status: int, body: bytes, headers: dict | None = None) -> None:
        self.owner.record(Request(self.owner.name, self.command, path, None, status, len(body),
                                  self.headers.get("Authorization")))
        self.send_response(status)
        for k, v in {**(headers or {}), "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def serve_directory(root: Path, faults: Faults | None = None) -> Server:
    """Static files under `root` at `server.url + "/" + relative path`."""
    return Server(RangeHandler, "static", root=Path(root), faults=faults)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class HubHandler(RangeHandler):
    """`/{org}/{name}/resolve/{rev}/{file}` over `root/{org}/{name}/{rev}/{file}`, token-checked."""

    def route(self, path: str) -> Path | None:
        m = _RESOLVE.match(path)
        if not m:
            return None
        return self.owner.root / m["repo"] / m["rev"] / m["file"]

    def allowed(self, path: str) -> bool:
        token = self.owner.hooks.get("token")
        if token and self.headers.get("Authorization") != f"Bearer {token}":
            self.answer(path, 401, b'{"error": "Invalid credentials"}\n', {"X-Error-Code": "RepoNotFound"})
            return False
        return True

    def redirected(self, path: str, file: Path) -> bool:
        cdn: Server | None = self.owner.hooks.get("cdn")
        if cdn is None or not path.endswith(".safetensors"):
            return False
        rel = file.relative_to(self.owner.root).as_posix()
        self.answer(path, 302, b"", {"Location": f"{cdn.url}/{rel}?X-Signature=abc123"})
        return True


def serve_hub(root: Path, token: str | None = None) -> tuple[Server, Server]:
    """(hub, cdn): the hub answers resolve URLs for repos under `root/{org}/{name}/{rev}/`; weight files
    redirect to the cdn, which serves `root` statically."""
    cdn = Server(RangeHandler, "cdn", root=Path(root))
    hub = Server(HubHandler, "hub", root=Path(root), token=token, cdn=cdn)
    return hub, cdn


# -- the servers' own behaviour ----------------------------------------------------------------------------
def _get(url: str, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_static_server_answers_ranges_like_a_real_one(tmp_path):
    data = bytes(range(256)) * 4
    (tmp_path / "f.bin").write_bytes(data)
    with serve_directory(tmp_path) as server:
        status, headers, body = _get(server.url + "/f.bin", {"Range": "bytes=10-19"})
        assert (status, headers["Content-Range"], body) == (206, "bytes 10-19/1024", data[10:20])
        status, headers, body = _get(server.url + "/f.bin", {"Range": "bytes=1000-5000"})
        assert (status, headers["Content-Range"], body) == (206, "bytes 1000-1023/1024", data[1000:])
        status, headers, _ = _get(server.url + "/f.bin", {"Range": "bytes=1024-"})
        assert (status, headers["Content-Range"]) == (416, "bytes */1024")
        status, headers, body = _get(server.url + "/f.bin")
        assert (status, body, headers["Content-Length"]) == (200, data, "1024") and headers["ETag"]
        assert _get(server.url + "/missing")[0] == 404


def test_hub_server_checks_the_token_and_redirects_weights_to_another_origin(tmp_path):
    repo = tmp_path / "org" / "name" / "main"
    repo.mkdir(parents=True)
    (repo / "model.safetensors").write_bytes(b"x" * 100)
    (repo / "config.json").write_text("{}")
    hub, cdn = serve_hub(tmp_path, token="secret")
    with hub, cdn:
        assert _get(hub.url + "/org/name/resolve/main/config.json")[0] == 401
        auth = {"Authorization": "Bearer secret"}
        assert _get(hub.url + "/org/name/resolve/main/config.json", auth)[2] == b"{}"
        # urllib follows the redirect (and, like every client, keeps the header: the cdn records it)
        status, _, body = _get(hub.url + "/org/name/resolve/main/model.safetensors", {"Range": "bytes=0-9"})
        assert status == 401
        status, _, body = _get(hub.url + "/org/name/resolve/main/model.safetensors", {**auth, "Range": "bytes=0-9"})
        assert (status, body) == (206, b"x" * 10)
        assert [r.status for r in hub.requests(suffix="model.safetensors")] == [401, 302]
        assert cdn.requests()[0].range == (0, 9)


def test_faults_are_seeded_and_bounded():
    def sequence(seed):
        faults = Faults(seed=seed, p503=0.5, pdrop=0.5, limit=5)
        return [faults.pick("a.safetensors") for _ in range(30)]

    assert sequence(1) == sequence(1)
    picks = sequence(1)
    assert sum(p is not None for p in picks) == 5
    assert all(not (a and b) for a, b in zip(picks, picks[1:]))  # never two in a row


__all__ = ["Faults", "Request", "Server", "serve_directory", "serve_hub"]
