"""One file at a URL, read in byte ranges over HTTP, with bounded retries (docs/remote.md).

Standard library only (http.client): a checkpoint needs ranged GETs and redirects, nothing more, and mmrec
keeps its dependencies few. Each thread keeps one keep-alive connection per server, so every dask
worker thread reads its own ranges on its own connection.

What the server says is checked, never trusted: a range answer must be the bytes asked for (Content-Range),
a file must keep the size, ETag and Last-Modified of its first answer (else it changed while being read),
and every read has a socket timeout and reads at most the bytes asked for, whatever a header claims.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import os
import re
import threading
import time
from urllib.parse import urljoin, urlsplit

from .catalog import SourceError

CHUNK = 16 << 20  # largest buffer a streamed range goes through
MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 30.0  # seconds: a server asking for longer is waited on for this long, not more
MAX_BACKOFF = 10.0
TOKEN_ENV = "HF_TOKEN"
REDIRECTS = {301, 302, 303, 307, 308}
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)$")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)$")


class RemoteError(SourceError):
    """A remote file that cannot be used as it is (missing, refused, changed, not a range server)."""


class _Transient(Exception):
    """A failure worth retrying: a dropped connection, a short read, a 5xx or 429 answer."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


# Network failures are all OSErrors (timeouts, resets, refusals, TLS) or http.client's protocol errors.
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


@dataclasses.dataclass(frozen=True)
class Settings:
    timeout: float  # seconds a connect or a read may wait
    retries: int  # retries after a failure that made no progress
    backoff: float  # first wait between retries, doubled each time (no jitter: runs are repeatable)


def settings() -> Settings:
    """From MMREC_HTTP_TIMEOUT / MMREC_HTTP_RETRIES / MMREC_HTTP_BACKOFF, or the defaults."""
    def number(name: str, default: float, kind, low: float, high: float):
        text = os.environ.get(name)
        if text is None:
            return default
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise SourceError(f"{name}={text[:40]!r}: expected a number from {low} to {high}")
        return value

    return Settings(timeout=number("MMREC_HTTP_TIMEOUT", 60.0, float, 0.1, 3600.0),
                    retries=number("MMREC_HTTP_RETRIES", 5, int, 0, 100),
                    backoff=number("MMREC_HTTP_BACKOFF", 0.5, float, 0.0, 60.0))


def origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


@dataclasses.dataclass(frozen=True)
class Identity:
    """What identifies one version of a remote file: a changed one differs in at least one of these."""

    size: int
    etag: str | None
    last_modified: str | None

    def differs(self, other: "Identity") -> str | None:
        if other.size != self.size:
            return f"size {self.size} -> {other.size}"
        if self.etag and other.etag and other.etag != self.etag:
            return f"ETag {self.etag} -> {other.etag}"
        if self.last_modified and other.last_modified and other.last_modified != self.last_modified:
            return f"Last-Modified {self.last_modified} -> {other.last_modified}"
        return None


_local = threading.local()  # per thread: {origin: HTTPConnection}


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
    """This thread's connection to the URL's server, and whether it already served a request."""
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    key = origin(url)
    conn = conns.get(key)
    if conn is None:
        scheme, host, port = key
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = conns[key] = cls(host, port, timeout=timeout)
    return conn, conn.sock is not None


def _drop_connection(url: str) -> None:
    conn = getattr(_local, "conns", {}).pop(origin(url), None)
    if conn is not None:
        conn.close()


class HttpFile:
    """A file at a URL. Picklable (a dask worker gets its own connections); the token is never stored:
    it is read from HF_TOKEN for each request and sent only to `token_origin`."""

    def __init__(self, url: str, token_origin: tuple[str, str, int] | None = None):
        self.url = url
        self.name = urlsplit(url).path.rsplit("/", 1)[-1]
        self.token_origin = token_origin
        self.identity: Identity | None = None  # from the first answer; every later one must match it
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HttpFile({self.url!r})"

    # -- what callers use -------------------------------------------------------------------------
    def exists(self, denied_ok: bool = False) -> bool:
        """Whether the file is there (404: False); records its size and identity. Asks for its first byte
        rather than a HEAD: range GETs are what a source must support anyway, while a HEAD may be refused
        (405) or not be covered by a redirect's signed URL (403). With denied_ok, a 401/403 to a request
        that carried no token is False too: object stores (S3, R2) answer 403 for a key that is not there."""
        def attempt():
            response = self._send("GET", {"Range": "bytes=0-0"}, missing_ok=True, denied_ok=denied_ok)
            if response is None:
                return False
            try:
                self._size_of(response)
            finally:
                self._release(response)
            return True

        return self._retrying(attempt)

    def size(self) -> int:
        if self.identity is None and not self.exists():
            raise RemoteError(f"{self.url}: not found (HTTP 404)")
        return self.identity.size

    def fetch_whole(self, limit: int, missing_ok: bool = False, denied_ok: bool = False) -> bytes | None:
        """The whole file (a config or index: small), refusing one over `limit` bytes before reading it.
        None when missing_ok and the server says 404 (with denied_ok also a tokenless 401/403, as exists())."""
        def attempt():
            response = self._send("GET", {}, missing_ok=missing_ok, denied_ok=denied_ok)
            if response is None:
                return None
            try:
                declared = _int_header(response, "Content-Length")
                if declared is not None and declared > limit:
                    raise RemoteError(f"{self.url}: is {declared} bytes, over the {limit}-byte limit for a "
                                      "file fetched whole")
                data = response.read(limit + 1)  # at most limit + 1 bytes, whatever the server sends
                if len(data) > limit:
                    raise RemoteError(f"{self.url}: is over the {limit}-byte limit for a file fetched whole")
                if declared is not None and len(data) < declared:
                    raise _Transient(f"connection closed after {len(data)} of {declared} bytes")
                self._check_identity(response, len(data))
                return data
            finally:
                self._release(response)

        return self._retrying(attempt)

    def read_into(self, start: int, out: memoryview) -> None:
        """Fill `out` with the file's bytes [start, start + len(out))."""
        self._transfer(start, len(out), lambda done, n: out[done:done + n], lambda view: None)

    def stream(self, start: int, length: int, sink, block: int = CHUNK) -> None:
        """Call sink(view) with bytes [start, start + length) in order, each byte once, at most `block`
        bytes at a time; the view is reused after sink returns. A broken transfer resumes where it stopped."""
        if length <= 0:
            return
        buffer = memoryview(bytearray(min(block, length)))
        self._transfer(start, length, lambda done, n: buffer[:min(n, len(buffer))], sink)

    def first_bytes(self, count: int) -> bytes:
        """Up to `count` bytes from the start, in one request (fewer when the file is shorter); records
        the file's size and identity."""
        def attempt():
            response = self._send("GET", {"Range": f"bytes=0-{count - 1}"})
            try:
                want = min(count, self._size_of(response))
                if want == 0:
                    return bytearray()
                last = self._check_range(response, 0, want)
                data = bytearray(response.read(last))
                if not data:
                    raise _Transient("connection closed before any byte arrived")
                return data
            finally:
                self._release(response)

        data = self._retrying(attempt)
        want = min(count, self.identity.size)
        if len(data) < want:  # a short answer: the rest with ordinary range reads
            rest = bytearray(want - len(data))
            self.read_into(len(data), memoryview(rest))
            data += rest
        return bytes(data)

    # -- requests ---------------------------------------------------------------------------------
    def _transfer(self, start: int, length: int, place, sink) -> None:
        end, pos = start + length, start
        config = settings()
        stalled = total = 0
        while pos < end:
            before = pos
            try:
                response = self._send("GET", {"Range": f"bytes={pos}-{end - 1}"})
                try:
                    last = self._check_range(response, pos, end)
                    while pos < last:
                        view = place(pos - start, min(CHUNK, last - pos))
                        got = response.readinto(view)
                        if not got:
                            raise _Transient(f"connection closed at byte {pos} of {start}-{end - 1}")
                        sink(view[:got])
                        pos += got
                finally:
                    self._release(response)
            except (_Transient, *_NETWORK_ERRORS) as exc:
                if isinstance(exc, OSError) and not _is_network_error(exc):
                    raise
                stalled = 0 if pos > before else stalled + 1
                total += 1
                self._wait_or_give_up(exc, stalled, total, config)

    def _retrying(self, attempt):
        config = settings()
        failures = 0
        while True:
            try:
                return attempt()
            except (_Transient, *_NETWORK_ERRORS) as exc:
                if isinstance(exc, OSError) and not _is_network_error(exc):
                    raise
                failures += 1
                self._wait_or_give_up(exc, failures, failures, config)

    def _wait_or_give_up(self, exc: Exception, stalled: int, total: int, config: Settings) -> None:
        _drop_connection(self.url)
        if stalled > config.retries or total > 4 * config.retries + 4:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise OSError(errno.EIO, f"cannot read from the server: {reason} (gave up after {total} "
                                     "failed attempts)", self.url) from None
        delay = min(MAX_BACKOFF, config.backoff * 2 ** (stalled - 1)) if stalled else 0.0
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        time.sleep(delay)

    def _send(self, method: str, headers: dict, missing_ok: bool = False, denied_ok: bool = False):
        """One request, following redirects; returns a response with a 2xx or 416 status. 404 is None
        with missing_ok, and so is a 401/403 to a request without a token with denied_ok; other refusals
        raise RemoteError; retryable answers raise _Transient."""
        config = settings()
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            sent = dict(headers)
            token = os.environ.get(TOKEN_ENV)
            token_sent = bool(token) and self.token_origin is not None and origin(url) == self.token_origin
            if token_sent:
                sent["Authorization"] = f"Bearer {_checked_token(token)}"
            try:
                response = self._exchange(url, method, target, sent, config.timeout)
            except (http.client.InvalidURL, UnicodeError) as exc:  # not worth a retry: it never changes
                _drop_connection(url)  # a request half started: the connection is not reused
                where = self.url if url == self.url else f"{self.url} (redirected to {url[:200]})"
                reason = "non-ASCII characters" if isinstance(exc, UnicodeError) else str(exc)[:200]
                raise RemoteError(f"{where}: not a URL HTTP can request ({reason}); percent-encode "
                                  "spaces, control and non-ASCII characters (%20, ...)") from None
            status = response.status
            if status in REDIRECTS:
                location = response.getheader("Location")
                self._release(response)
                if not location:
                    raise RemoteError(f"{self.url}: redirect (HTTP {status}) without a Location")
                url = urljoin(url, location)
                if urlsplit(url).scheme.lower() not in ("http", "https"):
                    raise RemoteError(f"{self.url}: redirected to a non-HTTP address")
                continue
            if 200 <= status < 300 or status == 416:
                return response
            self._release(response)
            if status in (404, 410):
                if missing_ok:
                    return None
                raise RemoteError(f"{self.url}: not found (HTTP {status})")
            if status in (401, 403):
                if denied_ok and missing_ok and not token_sent:
                    return None
                raise RemoteError(f"{self.url}: access denied (HTTP {status}); {self._auth_hint(url, token_sent)}")
            if status in RETRY_STATUSES:
                raise _Transient(f"HTTP {status} {response.reason}", _retry_after(response))
            raise RemoteError(f"{self.url}: the server answered HTTP {status} {response.reason}"[:300])
        raise RemoteError(f"{self.url}: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _exchange(url: str, method: str, target: str, headers: dict, timeout: float):
        """Send one request and read the answer's head. A kept-alive connection the server has closed
        meanwhile fails at once: that one is retried straight away on a new connection, not counted."""
        for fresh_retry in (False, True):
            conn, reused = _connection(url, timeout)
            try:
                conn.request(method, target, headers=headers)
                response = conn.getresponse()
            except _NETWORK_ERRORS:
                _drop_connection(url)
                if reused and not fresh_retry:
                    continue
                raise
            response.mmrec_url = url  # the connection it came on (_release closes that one)
            return response
        raise AssertionError("unreachable")

    def _auth_hint(self, url: str, token_sent: bool) -> str:
        """Whether the refused request (`url`: this hop) carried the token, and what to do about it."""
        if token_sent:
            return "the token in HF_TOKEN was sent and refused (is it valid, with access to this repository?)"
        if self.token_origin is not None and origin(url) == self.token_origin:
            return "no token was sent: set HF_TOKEN to a token with access to this repository"
        return "no token was sent to this server (HF_TOKEN goes only to the Hugging Face endpoint, for hf:// sources)"

    @staticmethod
    def _release(response) -> None:
        """Done with a response: a connection whose body was read to its end serves the next request; one
        with bytes left (an error mid-body, a bigger answer than we read) is closed, never reused."""
        if not response.isclosed() and response.length is not None and response.length <= 65536:
            try:
                response.read()  # a small leftover (an error page, a redirect's body): read it, keep the socket
            except _NETWORK_ERRORS:
                pass
        if not response.isclosed() or response.will_close:
            _drop_connection(response.mmrec_url)

    # -- checks -----------------------------------------------------------------------------------
    def _size_of(self, response) -> int:
        """The whole file's size from a range answer (206 Content-Range, 416, or a 200's length)."""
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.getheader("Content-Range") or "")
            if not match:
                raise RemoteError(f"{self.url}: answered a range request without a valid Content-Range")
            size = int(match.group(3))
        elif response.status == 416:
            match = _UNSATISFIED_RANGE.match(response.getheader("Content-Range") or "")
            if not match:
                raise RemoteError(f"{self.url}: refused a range request (HTTP 416) without giving its size")
            size = int(match.group(1))
        else:
            size = _int_header(response, "Content-Length")
            if size is None:
                raise RemoteError(f"{self.url}: the server gives no Content-Length, so its size is unknown")
        self._check_identity(response, size)
        return size

    def _check_range(self, response, pos: int, end: int) -> int:
        """Check a range answer is the bytes asked for (from `pos`); returns one past its last byte."""
        size = self._size_of(response)
        if response.status == 206:
            first, last = map(int, _CONTENT_RANGE.match(response.getheader("Content-Range")).group(1, 2))
            if first != pos or last < first or last >= end:
                raise RemoteError(f"{self.url}: asked for bytes {pos}-{end - 1}, the server sent {first}-{last}")
            return last + 1
        if response.status == 416 or end > size:
            raise RemoteError(f"{self.url}: bytes {pos}-{end - 1} are outside the file ({size} bytes)")
        if pos != 0:  # a 200 is the whole file: usable only when that is what we asked for
            raise RemoteError(f"{self.url}: the server does not support HTTP range requests (it answered 200 "
                              "to one); remote sources need them")
        return min(end, size)

    def _check_identity(self, response, size: int) -> None:
        seen = Identity(size, response.getheader("ETag"), response.getheader("Last-Modified"))
        with self._lock:
            if self.identity is None:
                self.identity = seen
                return
            change = self.identity.differs(seen)
        if change is not None:
            raise RemoteError(f"{self.url}: the file changed on the server while it was being read ({change}); "
                              "start the conversion again")


def _checked_token(token: str) -> str:
    """A token http.client can send. Its own check would put the value in the message: never shown here."""
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise SourceError(f"{TOKEN_ENV} holds characters a token cannot have (spaces, control or non-ASCII "
                          "characters); it was not sent")
    return token


def _int_header(response, name: str) -> int | None:
    text = response.getheader(name)
    if text is None or not text.strip().isdigit() or len(text.strip()) > 20:
        return None
    return int(text)


def _retry_after(response) -> float | None:
    text = (response.getheader("Retry-After") or "").strip()
    return float(text) if text.isdigit() and len(text) < 8 else None


def _is_network_error(exc: OSError) -> bool:
    """OSErrors of the connection (refused, reset, timed out, unreachable, TLS), not of a local file we
    write (a sink's pwrite error is an OSError too, and it is not ours to retry)."""
    return exc.filename is None
