"""Remote sources against servers that misbehave: every case ends in one clear error naming the URL, in
bounded time and memory, whatever the server claims. In-process (open_source / HttpFile), real servers."""

from __future__ import annotations

import errno
import os
import struct
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from mmrec.streaming.sources import SourceError, open_source, remote_url
from mmrec.streaming.sources.http_range import HttpFile
from test_remote_servers import RangeHandler, Server


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("MMREC_HTTP_BACKOFF", "0.01")
    monkeypatch.setenv("MMREC_HTTP_RETRIES", "1")
    monkeypatch.setenv("MMREC_HTTP_TIMEOUT", "0.5")
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A one-file safetensors checkpoint (written by the safetensors library) in tmp_path/ckpt/."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path / "ckpt"
    root.mkdir()
    save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(8, 8)}, str(root / "model.safetensors"))
    return root


def serving(handler_cls, root: Path) -> Server:
    return Server(handler_cls, "hostile", root=root)


class IgnoresRanges(RangeHandler):
    """Answers every GET with the whole file (200), as a server without range support does."""

    def serve(self, head: bool) -> None:
        if "Range" in self.headers:
            del self.headers["Range"]
        super().serve(head)


class ClaimsAHugeConfig(RangeHandler):
    def serve(self, head: bool) -> None:
        if self.path.endswith("config.json"):
            self.send_response(200)
            self.send_header("Content-Length", str(10 ** 15))
            self.end_headers()
            self.wfile.write(b"{" * 1000)  # and then nothing: we must not wait for the rest
            self.close_connection = True
            return
        super().serve(head)


class ClaimsAHugeFile(RangeHandler):
    def serve(self, head: bool) -> None:
        if self.path.endswith(".safetensors") and not head:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-7/{1 << 60}")
            self.send_header("Content-Length", "8")
            self.end_headers()
            self.wfile.write(struct.pack("<Q", 100))
            return
        super().serve(head)


class SendsTheWrongRange(RangeHandler):
    def serve(self, head: bool) -> None:
        if self.headers.get("Range", "").startswith("bytes=8-"):
            self.headers.replace_header("Range", "bytes=0-15")
        super().serve(head)


class Stalls(RangeHandler):
    """Takes the request, then sends nothing for longer than the client's timeout."""

    def serve(self, head: bool) -> None:
        time.sleep(2)
        self.close_connection = True


class RedirectsForever(RangeHandler):
    def serve(self, head: bool) -> None:
        self.answer(self.path, 302, b"", {"Location": self.path + "x"})


class RefusesHead(RangeHandler):
    def do_HEAD(self):
        self.answer(self.path, 405, b"")


def error_of(source: str) -> str:
    with pytest.raises(SourceError) as caught:
        open_source(source)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_server_without_range_support_is_named(checkpoint):
    with serving(IgnoresRanges, checkpoint.parent) as server:
        message = error_of(f"{server.url}/ckpt/")
    assert message.startswith(f"{server.url}/ckpt/model.safetensors: the server does not support HTTP range")


def test_an_absurd_content_length_is_refused_before_reading(checkpoint):
    with serving(ClaimsAHugeConfig, checkpoint.parent) as server:
        message = error_of(f"{server.url}/ckpt/")
    assert message == (f"{server.url}/ckpt/config.json: is 1000000000000000 bytes, over the 67108864-byte limit "
                       "for a file fetched whole")


def test_an_absurd_file_size_is_refused(checkpoint):
    with serving(ClaimsAHugeFile, checkpoint.parent) as server:
        message = error_of(f"{server.url}/ckpt/model.safetensors")
    assert message.startswith(f"{server.url}/ckpt/model.safetensors: the server gives a size of {1 << 60} bytes")


def test_a_header_length_bomb_gets_the_local_parser_s_message(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}" * 10)
    with serving(RangeHandler, tmp_path) as server:
        message = error_of(f"{server.url}/ckpt/")
    assert message == (f"{server.url}/ckpt/model.safetensors: not a safetensors file (its first 8 bytes give a "
                       "header length of 18446744073709551615, over the 100000000-byte limit)")


def test_a_range_answer_that_is_not_the_range_asked_for_is_refused(checkpoint):
    with serving(SendsTheWrongRange, checkpoint.parent) as server:
        message = error_of(f"{server.url}/ckpt/model.safetensors")
    assert "asked for bytes 8-" in message and "the server sent 0-15" in message


def test_a_stalled_server_times_out_and_gives_up_after_bounded_retries(checkpoint):
    with serving(Stalls, checkpoint.parent) as server:
        file = HttpFile(f"{server.url}/ckpt/model.safetensors")
        with pytest.raises(OSError) as caught:
            file.first_bytes(8)
    assert caught.value.errno == errno.EIO and caught.value.filename == file.url
    assert "gave up after 2 failed attempts" in caught.value.strerror


def test_a_redirect_loop_is_cut(checkpoint):
    with serving(RedirectsForever, checkpoint.parent) as server:
        message = error_of(f"{server.url}/ckpt/model.safetensors")
    assert message == f"{server.url}/ckpt/config.json: more than 5 redirects"  # the first file asked for


@pytest.mark.parametrize("url, fragment", [
    ("https://user:pw@example.com/ckpt/", "credentials in a URL are refused"),
    ("https://example.com/ckpt/model.safetensors?sig=1", "query or fragment is not supported"),
    ("https://example.com/ckpt/pytorch_model.bin", "not supported from a URL"),
    ("hf://a/b/c", "expected hf://org/name or hf://org/name@revision"),
    ("hf://org/name@", "the revision after '@' is empty"),
    ("http://example.com:port/ckpt/", "not a valid port"),
    ("https://example.com/d\u00edr/", "percent-encode them"),
    ("HTTPS://example.com/a b/", "percent-encode them"),
])
def test_bad_urls_are_refused_before_any_request(url, fragment):
    message = error_of(url)
    assert fragment in message and "pw" not in message


def test_only_a_string_spelled_as_a_url_is_remote():
    """A URL travels as a plain string (Path() would fold its '//'); a path that merely looks like one is local."""
    url = "https://example.com/a//b/./c@main?x"
    assert remote_url(url) == url and remote_url("HF://org/name") == "HF://org/name"
    assert remote_url(Path("/data/https:/x")) is None and remote_url("relative/dir") is None


def test_a_token_http_cannot_carry_is_refused_without_showing_it(tmp_path, monkeypatch):
    from test_remote_servers import serve_hub

    hub, cdn = serve_hub(tmp_path, token="x")
    with hub, cdn:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_abc\nsecret-part")
        message = error_of("hf://org/name")
        assert not hub.log  # nothing was sent
    assert message.startswith("HF_TOKEN holds characters a token cannot have") and "secret" not in message


def test_an_unreachable_server_is_bad_input_naming_the_url(checkpoint):
    with serving(RangeHandler, checkpoint.parent) as server:
        url = server.url
    message = error_of(f"{url}/ckpt/")  # the server is gone: connections are refused
    assert message.startswith(f"{url}/ckpt/model.safetensors.index.json: cannot read from the server: ")
    assert message.endswith("(gave up after 2 failed attempts)")


def test_a_server_refusing_head_is_probed_with_a_one_byte_get(checkpoint):
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0"}')
    with serving(RefusesHead, checkpoint.parent) as server:
        catalog = open_source(f"{server.url}/ckpt/")
        assert [p.name for p in catalog.aux_files] == ["tokenizer.json"]
        assert open(catalog.aux_files[0]).read() == '{"version": "1.0"}'  # fetched when first opened
    assert sorted(catalog.tensors) == ["a", "b"]
    assert catalog.read("b").tolist() == [[1.0] * 8] * 8


class RedirectsToASpace(RangeHandler):
    def serve(self, head: bool) -> None:
        self.answer(self.path, 302, b"", {"Location": "/a b/model.safetensors"})


def test_a_url_http_cannot_request_is_refused_once_not_retried(checkpoint, monkeypatch):
    monkeypatch.setenv("MMREC_HTTP_RETRIES", "5")
    monkeypatch.setenv("MMREC_HTTP_BACKOFF", "1")  # a retry would take seconds
    with serving(RedirectsToASpace, checkpoint.parent) as server:
        started = time.monotonic()
        message = error_of(f"{server.url}/ckpt/model.safetensors")
        assert len(server.log) == 1 and time.monotonic() - started < 1
    assert message.startswith(f"{server.url}/ckpt/config.json (redirected to {server.url}/a b/model.safetensors): "
                              "not a URL HTTP can request"), message


class DeniesMissing(RangeHandler):
    """An object store (S3, R2) without credentials: 403 for a key that is not there, not 404."""

    def route(self, path: str):
        file = super().route(path)
        return file if file.is_file() else None

    def serve(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if self.route(path) is None:
            return self.answer(path, 403, b"<Error><Code>AccessDenied</Code></Error>")
        super().serve(head)


def test_a_403_for_a_missing_optional_file_means_absent_without_a_token(checkpoint, monkeypatch):
    """No index, config or tokenizer file: each answered 403 (no token was sent), each taken as absent;
    a 403 for the weights themselves still says access denied, and that no token went to this server."""
    monkeypatch.setenv("HF_TOKEN", "hf_notForThisServer")
    monkeypatch.setenv("HF_ENDPOINT", "ftp://malformed")  # only hf:// sources read it
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0"}')
    (checkpoint.parent / "empty").mkdir()
    with serving(DeniesMissing, checkpoint.parent) as server:
        catalog = open_source(f"{server.url}/ckpt/")
        assert sorted(catalog.tensors) == ["a", "b"] and catalog.config is None
        assert [p.name for p in catalog.aux_files] == ["tokenizer.json"]
        message = error_of(f"{server.url}/empty/")
        assert all(r.authorization is None for r in server.log)
    assert message == (f"{server.url}/empty/model.safetensors: access denied (HTTP 403); no token was sent to this "
                       "server (HF_TOKEN goes only to the Hugging Face endpoint, for hf:// sources)")


class FailsTokenizerFiles(RangeHandler):
    def serve(self, head: bool) -> None:
        if "tokenizer" in self.path:
            return self.answer(self.path, 503, b"down\n")
        super().serve(head)


def test_a_server_failing_while_probing_copied_files_is_bad_input(checkpoint):
    with serving(FailsTokenizerFiles, checkpoint.parent) as server:
        catalog = open_source(f"{server.url}/ckpt/")
        with pytest.raises(SourceError) as caught:  # not an OSError: that would be a write failure, exit 4
            catalog.aux_files
    message = str(caught.value)
    assert message.startswith(f"{server.url}/ckpt/tokenizer") and "cannot read from the server: HTTP 503" in message


def test_a_local_write_error_while_downloading_a_copied_file_is_not_retried(checkpoint, tmp_path):
    (checkpoint / "tokenizer.json").write_bytes(b"x" * 100_000)  # over the write buffer: the sink writes
    with serving(RangeHandler, checkpoint.parent) as server:
        catalog = open_source(f"{server.url}/ckpt/")
        (aux,) = catalog.aux_files
        local = os.path.join(aux._downloads.dir, "tokenizer.json")
        os.symlink("/dev/full", local)  # every write: ENOSPC
        with pytest.raises(OSError) as caught:
            os.fspath(aux)
        fetches = [r for r in server.requests("GET", "tokenizer.json") if r.range != (0, 0)]
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == local
    assert len(fetches) == 1  # a local failure is not a network one: no retry
