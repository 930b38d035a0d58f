"""Bad inputs through the real CLI: every case exits non-zero with one line that names the file, tensor
or option and the problem, leaves the source byte-for-byte unchanged and writes nothing that looks like
a complete output. Valid but unusual inputs simply convert. (RELIABILITY.md is the table of these cases.)

Most cases run the Typer app in-process (CliRunner: milliseconds each); `test_real_process_*` run a few
through `python -m mmrec` to show what a user's terminal gets, with and without --debug.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmrec import MMRecModel
from mmrec.cli.app import app
from mmrec.streaming.verify import verify

CASES = []


def case(name: str, code: int, *fragments: str, args: tuple = ()):
    """Register a builder(tmp, ckpt) -> source path. Fragments and args may use {src} and {tmp}."""
    def register(builder):
        CASES.append(pytest.param(builder, code, fragments, args, id=name))
        return builder
    return register


def tree_digest(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under root (symlinks listed by target), skipping the output."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_symlink():
            out[str(p)] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_nothing_complete(out: Path) -> None:
    """No report, config, index or final shard: nothing a user or loader could take for a result."""
    if not out.exists() or not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    assert not names & {"conversion_report.json", "config.json", "model.safetensors.index.json"}, names
    assert not [n for n in names if n.endswith(".safetensors")], names


# -- the checkpoints cases start from -----------------------------------------------------------------------
class Ckpt:
    """Copies of the session's real checkpoints into a case's own directory."""

    def __init__(self, family_checkpoints, llama_layouts, tmp: Path):
        self.family_checkpoints, self.layouts, self.tmp = family_checkpoints, llama_layouts, tmp

    def sharded(self) -> Path:  # model-0000N-of-0000M.safetensors + index + config.json
        return Path(shutil.copytree(self.family_checkpoints["llama"], self.tmp / "src"))

    def single(self) -> Path:  # src/model.safetensors + config.json
        return Path(shutil.copytree(self.layouts["single_file"].parent, self.tmp / "src")) / "model.safetensors"

    def bin(self) -> Path:
        return Path(shutil.copytree(self.layouts["bin"], self.tmp / "src"))

    def meta(self) -> Path:
        return Path(shutil.copytree(self.layouts["meta"], self.tmp / "src"))

    def pt(self) -> Path:
        return Path(shutil.copytree(self.layouts["pt"].parent, self.tmp / "src")) / "model.pt"

    def raw_safetensors(self, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
        (self.tmp / "src").mkdir()
        path = self.tmp / "src" / "model.safetensors"
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
        return path


def _cut(path: Path, keep) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])
    return path


def _index(directory: Path, name="model.safetensors.index.json") -> tuple[Path, dict]:
    path = directory / name
    return path, json.loads(path.read_text())


def _point_first_tensor_at(directory: Path, file_name, name="model.safetensors.index.json") -> Path:
    path, data = _index(directory, name)
    data["weight_map"][next(iter(data["weight_map"]))] = file_name
    path.write_text(json.dumps(data))
    return directory


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

# -- safetensors: truncation at several points ----------------------------------------------------------------
for _name, _keep, _words in [
    ("empty", lambda n: 0, ("truncated", "0 bytes")),
    ("in-length-prefix", lambda n: 5, ("truncated",)),
    ("in-json-header", lambda n: 40, ("header length", "larger than the file")),
    ("mid-data", lambda n: n // 2, ("truncated", "data bytes")),
    ("last-byte", lambda n: n - 1, ("truncated",)),
]:
    case(f"safetensors-truncated-{_name}", 1, "model.safetensors", *_words)(
        lambda tmp, c, keep=_keep: _cut(c.single(), keep))

# -- safetensors: headers that lie ----------------------------------------------------------------------------
case("header-length-bomb-2^64", 1, "model.safetensors", "not a safetensors file", "over the 100000000-byte limit")(
    lambda tmp, c: c.raw_safetensors({}, length=2**64 - 1))
case("header-length-past-eof", 1, "model.safetensors", "larger than the file")(
    lambda tmp, c: c.raw_safetensors(b"{}", length=50_000_000))
case("header-not-json", 1, "model.safetensors", "not valid JSON")(
    lambda tmp, c: c.raw_safetensors(b"{this is not json"))
case("header-not-utf8", 1, "model.safetensors", "not valid JSON")(
    lambda tmp, c: c.raw_safetensors(b'{"\xff\xfe": 1}'))
case("header-json-array", 1, "model.safetensors", "not a JSON object")(
    lambda tmp, c: c.raw_safetensors(b"[1, 2, 3]"))
case("header-nested-100k-deep", 1, "model.safetensors", "nested too deeply")(
    lambda tmp, c: c.raw_safetensors(b'{"a":' + b"[" * 100_000))
case("header-entry-not-object", 1, "model.safetensors", "tensor 'w'", "not a JSON object")(
    lambda tmp, c: c.raw_safetensors({"w": [1, 2]}))
case("header-metadata-not-strings", 1, "model.safetensors", "__metadata__")(
    lambda tmp, c: c.raw_safetensors({"__metadata__": {"format": 1}, "w": F32}, b"\0" * 8))
case("unknown-dtype", 1, "model.safetensors", "tensor 'w'", "unknown dtype 'F42'")(
    lambda tmp, c: c.raw_safetensors({"w": {**F32, "dtype": "F42"}}, b"\0" * 8))
case("dtype-not-a-string", 1, "model.safetensors", "tensor 'w'", "unknown dtype ['F32']")(
    lambda tmp, c: c.raw_safetensors({"w": {**F32, "dtype": ["F32"]}}, b"\0" * 8))
case("shape-times-dtype-not-bytes", 1, "model.safetensors", "tensor 'w'", "needs 12 bytes", "span 8")(
    lambda tmp, c: c.raw_safetensors({"w": {**F32, "shape": [3]}}, b"\0" * 8))
case("shape-negative", 1, "model.safetensors", "tensor 'w'", "non-negative integers")(
    lambda tmp, c: c.raw_safetensors({"w": {**F32, "shape": [-2]}}, b"\0" * 8))
case("shape-5000-digit-integer", 1, "model.safetensors", "not valid JSON", "digits")(
    lambda tmp, c: c.raw_safetensors(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}'))
case("offsets-overlap", 1, "model.safetensors", "tensor 'b'", "overlaps")(
    lambda tmp, c: c.raw_safetensors({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12))
case("offsets-gap", 1, "model.safetensors", "tensor 'b'", "gap")(
    lambda tmp, c: c.raw_safetensors({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, b"\0" * 20))
case("offsets-past-end", 1, "model.safetensors", "truncated", "need 8 data bytes but the file has 4")(
    lambda tmp, c: c.raw_safetensors({"a": F32}, b"\0" * 4))
case("offsets-reversed", 1, "model.safetensors", "tensor 'a'", "data_offsets")(
    lambda tmp, c: c.raw_safetensors({"a": {**F32, "data_offsets": [8, 0]}}, b"\0" * 8))
case("duplicate-name-in-one-header", 1, "model.safetensors", "tensor 'w'", "named twice")(
    lambda tmp, c: c.raw_safetensors(b'{"w":' + json.dumps(F32).encode() + b',"w":'
                                     + json.dumps({**F32, "data_offsets": [8, 16]}).encode() + b"}", b"\0" * 16))


@case("duplicate-name-across-shards", 1, "'model.norm.weight'", "appears twice", "model-00001")
def _(tmp, c):
    src = c.sharded()
    first = sorted(src.glob("model-*.safetensors"))[0]
    extra = {"model.norm.weight": torch.ones(64)}
    save_file({**load_file(first), **extra}, first)
    return src


@case("git-lfs-pointer-shard", 1, "model-00001-of-", "Git LFS pointer", "git lfs pull")
def _(tmp, c):
    src = c.sharded()
    sorted(src.glob("model-*.safetensors"))[0].write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4096\n")
    return src


# -- index files ---------------------------------------------------------------------------------------------
case("index-names-missing-file", 1, "model.safetensors.index.json", "model-00099-of-00099.safetensors",
     "does not exist")(lambda tmp, c: _point_first_tensor_at(c.sharded(), "model-00099-of-00099.safetensors"))
case("index-path-dotdot", 1, "model.safetensors.index.json", "'../outside.safetensors'", "outside its directory")(
    lambda tmp, c: (save_file({"x": torch.zeros(1)}, tmp / "outside.safetensors"),
                    _point_first_tensor_at(c.sharded(), "../outside.safetensors"))[1])
case("index-path-absolute", 1, "model.safetensors.index.json", "'/etc/hostname'", "outside its directory")(
    lambda tmp, c: _point_first_tensor_at(c.sharded(), "/etc/hostname"))
case("index-path-not-a-string", 1, "model.safetensors.index.json", "not a file name")(
    lambda tmp, c: _point_first_tensor_at(c.sharded(), ["model-00001-of-00002.safetensors"]))
case("index-not-json", 1, "model.safetensors.index.json", "not valid JSON")(
    lambda tmp, c: ((c.sharded() / "model.safetensors.index.json").write_text("{\"weight_map\": "), tmp / "src")[1])
case("index-without-weight-map", 1, "model.safetensors.index.json", "weight_map")(
    lambda tmp, c: ((c.sharded() / "model.safetensors.index.json").write_text('{"metadata": {}}'), tmp / "src")[1])


@case("index-symlink-leading-out", 1, "model.safetensors.index.json", "link.safetensors",
      "outside its directory")
def _(tmp, c):
    src = c.sharded()
    save_file({"x": torch.zeros(2)}, tmp / "elsewhere.safetensors")
    (src / "link.safetensors").symlink_to(tmp / "elsewhere.safetensors")
    return _point_first_tensor_at(src, "link.safetensors")


@case("index-lists-tensor-not-in-file", 1, "model.safetensors.index.json", "model.layers.7.extra.weight",
      "no such tensor")
def _(tmp, c):
    src = c.sharded()
    path, data = _index(src)
    data["weight_map"]["model.layers.7.extra.weight"] = next(iter(data["weight_map"].values()))
    path.write_text(json.dumps(data))
    return src


@case("dir-weights-symlink-leading-out", 1, "model.safetensors", "symlink leading outside the source")
def _(tmp, c):
    single = c.single()
    (tmp / "elsewhere").mkdir()
    single.rename(tmp / "elsewhere" / "model.safetensors")
    single.symlink_to(tmp / "elsewhere" / "model.safetensors")
    return single.parent  # the directory: its files must be its own


@case("tokenizer-symlink-leading-out", 1, "tokenizer.json", "symlink leading outside the source")
def _(tmp, c):
    src = c.sharded()
    (src / "tokenizer.json").unlink()
    (tmp / "secret.txt").write_text("not for the output")
    (src / "tokenizer.json").symlink_to(tmp / "secret.txt")  # would be copied into the output
    return src


# -- torch files ---------------------------------------------------------------------------------------------
@case("legacy-non-zip-torch-file", 1, "old.pt", "legacy (non-zip)", "re-save")
def _(tmp, c):
    (tmp / "src").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp / "src" / "old.pt", _use_new_zipfile_serialization=False)
    return tmp / "src" / "old.pt"


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


@case("pickle-that-runs-code", 1, "model.pt", "refusing to unpickle 'io.open'")
def _(tmp, c):
    (tmp / "src").mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(8, 4), "hook": _RunsCode(str(tmp / "ran"))},
               tmp / "src" / "model.pt")
    return tmp / "src" / "model.pt"


for _name, _keep in [("10-bytes", lambda n: 10), ("half", lambda n: n // 2), ("minus-100-bytes", lambda n: n - 100)]:
    case(f"torch-zip-truncated-{_name}", 1, "model.pt")(lambda tmp, c, keep=_keep: _cut(c.pt(), keep))

case("torch-random-bytes", 1, "model.pt", "not a torch.save file")(
    lambda tmp, c: (c.pt().write_bytes(os.urandom(64) .replace(b"\x80", b"\x00").replace(b"PK", b"pk")),
                    tmp / "src" / "model.pt")[1])


@case("torch-file-without-tensors", 1, "model.pt", "no state dict")
def _(tmp, c):
    (tmp / "src").mkdir()
    torch.save({"epoch": 3, "lr": 0.1}, tmp / "src" / "model.pt")
    return tmp / "src" / "model.pt"


@case("bin-index-names-missing-file", 1, "pytorch_model.bin.index.json", "does not exist")
def _(tmp, c):
    return _point_first_tensor_at(c.bin(), "pytorch_model-00007-of-00009.bin", "pytorch_model.bin.index.json")


@case("bin-shard-git-lfs-pointer", 1, "pytorch_model-00002-of-00003.bin", "Git LFS pointer")
def _(tmp, c):
    src = c.bin()
    (src / "pytorch_model-00002-of-00003.bin").write_text("version https://git-lfs.github.com/spec/v1\n")
    return src


# -- Meta layout --------------------------------------------------------------------------------------------
case("meta-without-params-json", 1, "no params.json")(
    lambda tmp, c: ((c.meta() / "params.json").unlink(), tmp / "src")[1])
case("meta-params-not-json", 1, "params.json", "not valid JSON")(
    lambda tmp, c: ((c.meta() / "params.json").write_text("{'dim': 64}"), tmp / "src")[1])
case("meta-shard-truncated", 1, "consolidated.01.pth")(
    lambda tmp, c: (_cut(c.meta() / "consolidated.01.pth", lambda n: n - 200), tmp / "src")[1])


# -- directories, families, configs, mapping files ------------------------------------------------------
case("source-does-not-exist", 1, "does not exist")(lambda tmp, c: tmp / "no-such-checkpoint")


@case("directory-without-weights", 1, "no weights found")
def _(tmp, c):
    (tmp / "src").mkdir()
    (tmp / "src" / "config.json").write_text('{"model_type": "llama"}')
    (tmp / "src" / "training_args.bin").write_bytes(b"PK\x03\x04 not weights")
    return tmp / "src"


@case("unknown-family", 1, "falcon", "--mapping-file")
def _(tmp, c):
    src = c.sharded()
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    return src


case("config-json-invalid", 1, "config.json", "not valid JSON")(
    lambda tmp, c: ((c.sharded() / "config.json").write_text("{oops"), tmp / "src")[1])
case("mapping-file-not-json", 1, "--mapping-file", "not valid JSON", args=("--mapping-file", "{tmp}/map.json"))(
    lambda tmp, c: ((tmp / "map.json").write_text("[{"), c.sharded())[1])
case("mapping-file-missing", 1, "--mapping-file", "cannot read", args=("--mapping-file", "{tmp}/none.yaml"))(
    lambda tmp, c: c.sharded())
case("mapping-file-unknown-op", 1, "--mapping-file", "explode",
     args=("--mapping-file", "{tmp}/map.json"))(
    lambda tmp, c: ((tmp / "map.json").write_text(json.dumps(
        [{"target": "blocks.{i}.W_q.weight", "source": "layers.{i}.self_attn.q_proj.weight",
          "transforms": [{"op": "explode"}]}])), c.sharded())[1])
case("mapping-file-unknown-key", 1, "--mapping-file", "unknown keys", "'sauce'",
     args=("--mapping-file", "{tmp}/map.yaml"))(
    lambda tmp, c: ((tmp / "map.yaml").write_text("- target: norm.weight\n  sauce: norm.weight\n"), c.sharded())[1])
case("target-heads-do-not-divide-dim", 2, "--num_heads 7 must divide the model dim 64", args=("--num_heads", "7"))(
    lambda tmp, c: c.sharded())
case("layer-map-names-missing-layer", 1, "--layer-map", args=("--layer-map", "0,9"))(lambda tmp, c: c.sharded())
# Option values whose syntax the command checks before reading anything: exit 2.
case("layer-map-not-numbers", 2, "--layer-map", "'x' is not a layer number", args=("--layer-map", "x,y"))(
    lambda tmp, c: c.sharded())
case("mapping-unknown-table", 2, "--mapping must be 'default' or 'extended'", args=("--mapping", "bogus"))(
    lambda tmp, c: c.sharded())
case("num-layers-zero", 2, "--num_layers must be a positive integer", args=("--num_layers", "0"))(
    lambda tmp, c: c.sharded())

# -- bad option values (exit 2, before anything is read) ----------------------------------------------------
for _opt, _value in [("--max-shard-size", "0"), ("--max-shard-size", "-5MB"), ("--max-shard-size", "5XB"),
                     ("--memory-budget", "lots"), ("--dtype", "float7"), ("--threads", "0"), ("--workers", "0")]:
    case(f"option{_opt}={_value}", 2, _opt, args=(_opt, _value))(lambda tmp, c: c.sharded())

# -- outputs that are refused (exit 3) ----------------------------------------------------------------------
case("output-inside-source", 3, "inside the source", args=("--output", "{src}/converted"))(
    lambda tmp, c: c.sharded())
case("output-is-source", 3, "inside the source", args=("--output", "{src}"))(lambda tmp, c: c.sharded())
case("output-contains-source", 3, "contains the source", args=("--output", "{tmp}"))(lambda tmp, c: c.sharded())
case("output-is-the-source-file", 3, "inside the source", args=("--output", "{src}"))(lambda tmp, c: c.single())


@case("output-inside-source-through-symlink", 3, "inside the source", args=("--output", "{tmp}/alias/out"))
def _(tmp, c):
    src = c.sharded()
    (tmp / "alias").symlink_to(src)
    return src


@case("output-is-a-file", 3, "is a file, not a directory", args=("--output", "{tmp}/notes.txt"))
def _(tmp, c):
    (tmp / "notes.txt").write_text("mine")
    return c.sharded()


@pytest.mark.parametrize("builder, code, fragments, args", CASES)
def test_bad_input(builder, code, fragments, args, family_checkpoints, llama_layouts, tmp_path):
    source = Path(builder(tmp_path, Ckpt(family_checkpoints, llama_layouts, tmp_path)))
    fmt = dict(src=source, tmp=tmp_path)
    args = [a.format(**fmt) for a in args]
    out = tmp_path / "out"
    if "--output" not in args:
        args += ["--output", str(out)]
    else:
        out = Path(args[args.index("--output") + 1])
    existed = out.exists()  # then it is checked unchanged with everything else (it may be the source)
    before = tree_digest(tmp_path, skip=None if existed else out)
    result = CliRunner().invoke(app, ["shard-convert", "--source", str(source), *args, "-q"])
    assert isinstance(result.exception, SystemExit), result.exception  # no escaped exception
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "internal error" not in lines[0]
    for fragment in fragments:
        assert fragment.format(**fmt) in lines[0], (fragment, lines[0])
    assert len(lines[0]) < 600, lines[0]
    assert tree_digest(tmp_path, skip=None if existed else out) == before  # the source is unchanged
    assert not (tmp_path / "ran").exists()  # no pickle ran code
    if not existed:
        assert_nothing_complete(out)
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_there_are_enough_cases():
    assert len(CASES) >= 60


# -- what a real terminal shows ------------------------------------------------------------------------------
def _run(*args):
    return subprocess.run([sys.executable, "-m", "mmrec", *map(str, args)], capture_output=True, text=True)


def test_real_process_one_line_and_debug_traceback(tmp_path):
    (tmp_path / "src").mkdir()
    bad = tmp_path / "src" / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    plain = _run("shard-convert", "--source", bad, "--output", tmp_path / "out")
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.splitlines() == [f"error: {bad}: not a safetensors file (its first 8 bytes give a header "
                                         f"length of {2**40}, over the 100000000-byte limit)"]
    debug = _run("shard-convert", "--source", bad, "--output", tmp_path / "out", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "SourceError" in debug.stderr
    assert not (tmp_path / "out").exists()


# -- valid but unusual inputs: they simply work -------------------------------------------------------------
def _convert(source: Path, out: Path, *args) -> dict:
    result = CliRunner().invoke(app, ["shard-convert", "--source", str(source), "--output", str(out), "--json",
                                      "-q", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def test_zero_size_tensors_unicode_names_and_header_padding(family_checkpoints, tmp_path):
    src = Path(shutil.copytree(family_checkpoints["llama"], tmp_path / "src"))
    first = sorted(src.glob("model-*.safetensors"))[0]
    tensors = load_file(first)
    # A zero-size tensor, a 0-d one and unicode names; then re-pad the header with spaces (as the
    # safetensors library does for alignment) and a leading newline.
    tensors.update({"model.empty.weight": torch.zeros(0, 64), "model.also_empty": torch.zeros(0),
                    "model.ölçek.weight": torch.ones(3), "model.слой.重み": torch.ones(2, 2),
                    "model.scalar": torch.tensor(2.0)})
    save_file(tensors, first)
    data = first.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = b"\n" + data[8:8 + n].rstrip(b" ") + b" " * 61
    first.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])
    path, index = _index(src)
    index["weight_map"].update({k: first.name for k in ("model.empty.weight", "model.also_empty",
                                                        "model.ölçek.weight", "model.слой.重み", "model.scalar")})
    path.write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")

    report = _convert(src, tmp_path / "out")
    dropped = json.dumps(report["dropped"], ensure_ascii=False)
    for name in ("empty.weight", "ölçek.weight", "слой.重み"):
        assert name in dropped
    reference = _convert(family_checkpoints["llama"], tmp_path / "ref")
    assert ({n: t["checksum"] for n, t in report["tensors"].items()}
            == {n: t["checksum"] for n, t in reference["tensors"].items()})
    assert verify(tmp_path / "out", src).ok


def test_tensor_larger_than_max_shard_size_gets_its_own_shard(family_checkpoints, tmp_path):
    out = tmp_path / "out"
    _convert(family_checkpoints["llama"], out, "--max-shard-size", "1KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) == len(set(index["weight_map"].values())) > 10
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        if any(e["data_offsets"][1] - e["data_offsets"][0] > 1000 for e in header.values()):
            assert len(header) == 1, (f.name, list(header))  # an oversized tensor has a shard of its own
    MMRecModel.from_pretrained(out)
    assert verify(out, family_checkpoints["llama"]).ok


def test_tied_tensors_sharing_storage_in_a_bin(family_checkpoints, tmp_path):
    state = {}
    for f in sorted(family_checkpoints["llama"].glob("*.safetensors")):
        state.update(load_file(f))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one storage, two names (tied)
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    config = json.loads((family_checkpoints["llama"] / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with zipfile.ZipFile(src / "pytorch_model.bin") as zf:  # really shared: one storage fewer than names
        assert len([n for n in zf.namelist() if "/data/" in n]) == len(state) - 1
    _convert(src, tmp_path / "out")
    model = MMRecModel.from_pretrained(tmp_path / "out")
    assert torch.equal(model.embedding.weight, state["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_hugging_face_cache_snapshot_with_symlinked_blobs(family_checkpoints, tmp_path):
    """models--org--name/snapshots/<rev>/* are symlinks to ../../blobs/<hash>: that is not 'outside'."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(family_checkpoints["llama"].iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    _convert(snapshot, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert verify(tmp_path / "out", family_checkpoints["llama"]).ok


def test_single_file_source_allows_sibling_outputs(tmp_path):
    """A single .safetensors source: its directory itself is refused, siblings are fine."""
    from mmrec.streaming.convert import ConvertOptions, convert
    from mmrec.streaming.output import OutputRefused
    from mmrec.streaming.synthetic import write_synthetic_llama

    source_dir = write_synthetic_llama(tmp_path / "models", "tiny")
    source = source_dir / "model.safetensors"
    before = source.read_bytes()
    with pytest.raises(OutputRefused, match="inside the source"):
        convert(ConvertOptions(source=source, output=source_dir, quiet=True))
    convert(ConvertOptions(source=source, output=source_dir / "converted", quiet=True))
    convert(ConvertOptions(source=source, output=source_dir / "converted.safetensors", quiet=True))
    assert (source_dir / "converted" / "conversion_report.json").exists()
    assert (source_dir / "converted.safetensors").exists() and source.read_bytes() == before
