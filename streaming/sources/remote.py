"""Remote safetensors checkpoints: `https://host/dir/`, `hf://org/name[@revision]` (docs/remote.md).

`open_remote(url)` catalogs a checkpoint like `open_source` does for a directory, from its headers only:
the index (or one model.safetensors), config.json and each file's header are fetched; tensor bytes are
read later, by the write tasks, as HTTP range requests (`RemoteCatalog.stream` for copies,
`RemoteCatalog.read` for computed rows). Imported only when a source is a URL.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import tempfile
import threading
import weakref
from urllib.parse import quote, unquote, urlsplit

from mmrec.safetensors_format import SafetensorsFormatError, header_length, parse_header
from mmrec.shards import INDEX_NAME, SINGLE_NAME, TOKENIZER_FILES

from .catalog import (Piece, SourceCatalog, SourceError, SourceTensor, build_tensors, contiguous_strides,
                      normalize_name, parse_json_object)
from .http_range import HttpFile, RemoteError, origin
from .safetensors_source import check_index_matches

DEFAULT_ENDPOINT = "https://huggingface.co"
HEADER_PROBE = 8  # the header's length first, then exactly the header: no tensor byte is fetched twice
MAX_JSON_BYTES = 64 << 20  # config.json, the index
MAX_AUX_BYTES = 256 << 20  # tokenizer and other copied files (tokenizer.json of large vocabularies: ~35 MB)
MAX_FILE_BYTES = 1 << 50  # a server claiming a larger file is not serving a checkpoint
HEADER_THREADS = 8  # headers of a many-shard checkpoint are fetched in parallel
TORCH_NAMES = ("pytorch_model.bin.index.json", "pytorch_model.bin")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class RemotePath(str):
    """A URL standing where a catalog keeps a Path (root, files): str() is the URL, `.name` its last
    part, `root / "config.json"` the URL of that file."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, other: str) -> "RemotePath":
        return RemotePath(self.rstrip("/") + "/" + quote(str(other)))


def hf_endpoint() -> str:
    """The Hugging Face endpoint as huggingface_hub finds it: HF_ENDPOINT, else huggingface.co."""
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if not endpoint.lower().startswith(("http://", "https://")):
        raise SourceError(f"HF_ENDPOINT={endpoint[:80]!r}: expected an http:// or https:// address")
    return endpoint


def locate(url: str) -> tuple[str, str | None]:
    """(base URL ending in '/', the weight file named by the URL or None for a directory)."""
    if url.lower().startswith("hf://"):
        return _hub_base(url), None
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        # http.client would fail on it (UnicodeEncodeError, InvalidURL) only once a request is made
        raise SourceError(f"{url[:200]}: a URL cannot hold spaces, control or non-ASCII characters; "
                          "percent-encode them (a space as %20)")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise SourceError(f"{parts.scheme}://{parts.hostname}/...: credentials in a URL are refused (they would "
                          "be shown in messages and the report); use HF_TOKEN for the Hugging Face Hub")
    if parts.query or parts.fragment:
        raise SourceError(f"{url[:200]}: a source URL with a query or fragment is not supported")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port only when asked)
    except ValueError:
        raise SourceError(f"{url[:200]}: not a valid port") from None
    if not parts.hostname:
        raise SourceError(f"{url[:200]}: not a URL with a host")
    quoted = (parts.path or "/").rsplit("/", 1)[-1]
    name = unquote(quoted)  # RemotePath quotes it again when it builds the file's URL
    if name.endswith((".bin", ".pt", ".pth")) or name in TORCH_NAMES:
        raise _torch_refusal(url)
    if name.endswith(".safetensors") or name.endswith(".index.json"):
        return url[:len(url) - len(quoted)], name
    if name.endswith(".json"):
        raise SourceError(f"{url}: not a checkpoint file (expected a directory URL, a .safetensors file or "
                          f"{INDEX_NAME})")
    return url if url.endswith("/") else url + "/", None


def _hub_base(url: str) -> str:
    spec = url[len("hf://"):]
    repo, _, revision = spec.partition("@")
    repo = repo.strip("/")
    if not _REPO_ID.match(repo) or ".." in repo or "--" in repo:
        raise SourceError(f"{url[:200]}: expected hf://org/name or hf://org/name@revision")
    if "@" in spec and not revision:
        raise SourceError(f"{url[:200]}: the revision after '@' is empty")
    revision = revision or "main"
    if not revision.isprintable() or any(c.isspace() for c in revision) or len(revision) > 255:
        raise SourceError(f"{url[:200]}: revision {revision[:80]!r} is not a valid branch, tag or commit")
    return f"{hf_endpoint()}/{repo}/resolve/{quote(revision, safe='')}/"


def _torch_refusal(where: str) -> SourceError:
    return SourceError(f"{where}: PyTorch .bin/.pt/.pth checkpoints are not supported from a URL, only "
                       "safetensors; download it and convert the local copy")


@contextlib.contextmanager
def _server_errors(url: str):
    """A server that cannot be read (retries spent, an OSError naming its URL) is bad input, exit 1."""
    try:
        yield
    except OSError as exc:
        raise SourceError(f"{exc.filename or url}: {exc.strerror or exc}") from None


class RemoteCatalog(SourceCatalog):
    """A SourceCatalog whose files are URLs: no memory maps, every read is an HTTP range request."""

    def __init__(self, url: str, base: str, files: dict[str, HttpFile], tensors: dict[str, SourceTensor],
                 config: dict | None):
        # aux_files None: probed when first asked for (a conversion copies them; its workers never ask)
        super().__init__(RemotePath(base), "safetensors", [RemotePath(u) for u in files], tensors, config, None)
        self.url = url
        self.http_files = files

    def __repr__(self) -> str:
        return f"RemoteCatalog({self.url!r}, {len(self.tensors)} tensors)"

    def __getstate__(self):
        state = super().__getstate__()
        state["_aux"] = None
        return state

    @property
    def aux_files(self):
        if self._aux is None:
            self._aux = _probe_aux(self)
        return self._aux

    @aux_files.setter
    def aux_files(self, value) -> None:
        self._aux = value

    # -- reading: SourceCatalog.read finds no map and calls _pread ----------------------------------------
    def _map(self, file: str):
        return None

    def _pread(self, file: str, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        self.http_files[file].read_into(offset, memoryview(buf))
        return buf

    def stream(self, file: str, start: int, length: int, sink, block: int) -> None:
        """Bytes [start, start + length) of `file` to sink(view), in order, at most `block` at a time."""
        self.http_files[file].stream(start, length, sink, block)

    def _file_identity(self, file) -> list:
        ident = self.http_files[str(file)].identity
        return [str(file), ident.size, ident.etag, ident.last_modified]


_opened: "weakref.WeakValueDictionary[str, RemoteCatalog]" = weakref.WeakValueDictionary()
_opened_lock = threading.Lock()


def opened_catalog(fingerprint: str) -> RemoteCatalog | None:
    """A catalog this process already opened with this fingerprint (the driver's, for the threaded
    scheduler's tasks): its headers need no second fetch."""
    with _opened_lock:
        return _opened.get(fingerprint)


def open_remote(url: str) -> RemoteCatalog:
    """Catalog a remote safetensors checkpoint from its index, config.json and headers only."""
    with _server_errors(url):  # the server could not be read (retries spent): nothing was written, bad input
        return _open_remote(url)


def _open_remote(url: str) -> RemoteCatalog:
    base, named = locate(url)
    # HF_TOKEN goes to the Hub endpoint, for hf:// sources only, and nowhere else
    token_origin = origin(hf_endpoint()) if url.lower().startswith("hf://") else None

    def remote(name: str) -> HttpFile:
        return HttpFile(str(RemotePath(base) / name), token_origin)

    index = None
    if named is None or named.endswith(".index.json"):
        index_file = remote(named or INDEX_NAME)
        # probing a directory: a 401/403 without a token is "not there" (object stores answer 403 for a
        # missing key); model.safetensors, probed next, gets no such leniency
        data = index_file.fetch_whole(MAX_JSON_BYTES, missing_ok=named is None, denied_ok=named is None)
        if data is not None:
            index = (index_file, parse_json_object(index_file.url, data))
    if index is not None:
        names, by_name = _files_from_index(index[0].url, index[1])
        files = {f.url: f for f in map(remote, names)}
    else:
        single = remote(named or SINGLE_NAME)
        if named is None and not single.exists():
            raise _nothing_there(base, remote)
        files = {single.url: single}
    config_file = remote("config.json")
    config_bytes = config_file.fetch_whole(MAX_JSON_BYTES, missing_ok=True, denied_ok=True)
    config = None if config_bytes is None else parse_json_object(config_file.url, config_bytes)

    with concurrent.futures.ThreadPoolExecutor(min(HEADER_THREADS, len(files))) as pool:
        entries = [t for ts in pool.map(_header_entries, files.values()) for t in ts]
    if index is not None:
        check_index_matches(RemotePath(index[0].url), {k: RemotePath(base) / v for k, v in by_name.items()},
                            entries)
    if not entries:
        raise SourceError(f"{url}: holds no tensors")
    tensors = build_tensors(entries, lambda t: RemotePath(t.pieces[0].file).name)
    catalog = RemoteCatalog(url, base, files, tensors, config)
    with _opened_lock:
        _opened[catalog.fingerprint()] = catalog
    return catalog


def _nothing_there(base: str, remote) -> SourceError:
    for name in TORCH_NAMES:
        if remote(name).exists(denied_ok=True):
            return _torch_refusal(str(RemotePath(base) / name))
    return SourceError(f"{base}: no {INDEX_NAME} or {SINGLE_NAME} there (neither was found); a remote source "
                       "must be a safetensors checkpoint")


def _files_from_index(index_url: str, index: dict) -> tuple[list[str], dict[str, str]]:
    """Weight file names of an index (first-mention order) and its tensor -> file name map, checked as
    paths.resolve_in_dir checks local ones: plain relative names, safetensors only."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_url}: has no 'weight_map' object")
    names: dict[str, None] = {}
    for tensor_name, file_name in weight_map.items():
        if not isinstance(file_name, str) or not file_name or "\0" in file_name:
            raise SourceError(f"{index_url}: tensor '{tensor_name[:200]}' maps to {str(file_name)[:80]!r}, not a "
                              "file name")
        if file_name not in names:
            if not file_name.isprintable() or len(file_name) > 255:
                raise SourceError(f"{index_url}: file name {file_name[:80]!r} is not a plausible weight file name")
            parts = file_name.split("/")
            if file_name.startswith("/") or ".." in parts or "." in parts or "" in parts or "\\" in file_name:
                raise SourceError(f"{index_url}: refers to '{file_name}', a path outside its directory")
            if file_name.endswith((".bin", ".pt", ".pth")):
                raise _torch_refusal(index_url)
            if not file_name.endswith(".safetensors"):
                raise SourceError(f"{index_url}: refers to '{file_name}', not a .safetensors file")
            names[file_name] = None
    return list(names), dict(weight_map)


def _header_entries(file: HttpFile) -> list[SourceTensor]:
    """The file's tensors from its header, checked by the same parser as a local file's."""
    prefix = file.first_bytes(HEADER_PROBE)
    size = file.identity.size
    if size > MAX_FILE_BYTES:
        raise SourceError(f"{file.url}: the server gives a size of {size} bytes; not a checkpoint file")
    try:
        header_len = header_length(file.url, prefix, size)  # checked against the limit and the file's size
        if len(prefix) < 8 + header_len:  # a big header: the rest of it
            rest = bytearray(8 + header_len - len(prefix))
            file.read_into(len(prefix), memoryview(rest))
            prefix += rest
        header = parse_header(file.url, bytes(prefix[8:8 + header_len]), size)
    except SafetensorsFormatError as exc:
        raise SourceError(str(exc)) from None
    out = []
    for span in header.tensors.values():
        piece = Piece(file.url, span.start, span.shape, contiguous_strides(span.shape))
        out.append(SourceTensor(normalize_name(span.name), span.name, span.dtype, span.shape, (piece,), None))
    return out


# -- copied files (tokenizer, generation config, ...) ----------------------------------------------------
class RemoteAuxFile(os.PathLike):
    """A small file copied next to the output. str() is its URL; os.fspath() fetches it once (bounded) into
    a temporary directory and gives that path, so the output's commit copies it like a local file."""

    def __init__(self, file: HttpFile, downloads: "_Downloads"):
        self.file = file
        self.name = file.name
        self._downloads = downloads
        self._local: str | None = None
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return self.file.url

    def __repr__(self) -> str:
        return f"RemoteAuxFile({self.file.url!r})"

    def __fspath__(self) -> str:
        with self._lock:
            if self._local is None:
                self._local = self._downloads.fetch(self.file)
            return self._local


class _Downloads:
    """One temporary directory for a catalog's copied files, removed when the catalog goes (or at exit)."""

    def __init__(self, owner):
        self.dir = tempfile.mkdtemp(prefix="mmrec-remote-")
        weakref.finalize(owner, shutil.rmtree, self.dir, True)

    def fetch(self, file: HttpFile) -> str:
        size = file.size()
        if size > MAX_AUX_BYTES:
            raise SourceError(f"{file.url}: is {size} bytes, over the {MAX_AUX_BYTES}-byte limit for a copied file")
        path = os.path.join(self.dir, file.name)

        def write(view) -> None:
            try:
                f.write(view)
            except OSError as exc:  # a local failure (disk full): named, so never retried as a network one
                raise OSError(exc.errno, exc.strerror or str(exc), path) from exc

        try:
            with open(path, "wb") as f:
                file.stream(0, size, write)
        except OSError as exc:
            if exc.filename is None:  # flush/close of the local copy
                raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
            raise
        return path


def _probe_aux(catalog: RemoteCatalog) -> list[RemoteAuxFile]:
    """Which of the known tokenizer/generation files exist (one probe each: plain https has no listing)."""
    token_origin = next(iter(catalog.http_files.values())).token_origin
    downloads = _Downloads(catalog)
    candidates = [HttpFile(str(catalog.root / n), token_origin) for n in TOKENIZER_FILES]
    with _server_errors(catalog.url), concurrent.futures.ThreadPoolExecutor(HEADER_THREADS) as pool:
        # optional files: a 401/403 without a token means absent (object stores answer 403 for a missing key)
        found = list(pool.map(lambda f: f.exists(denied_ok=True), candidates))
    return [RemoteAuxFile(f, downloads) for f, ok in zip(candidates, found) if ok]


__all__ = ["RemoteCatalog", "RemotePath", "open_remote", "opened_catalog", "locate", "hf_endpoint",
           "RemoteError"]
