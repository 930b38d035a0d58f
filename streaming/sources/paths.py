"""File checks shared by every layout: index entries that stay inside their directory, LFS pointers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mmrec.safetensors_format import LFS_PREFIX

from .catalog import SourceError


def allowed_roots(root: Path) -> list[Path]:
    """Where the files of a checkpoint directory may really live: the directory itself and, for a
    Hugging Face cache snapshot (`models--org--name/snapshots/<rev>/`, whose files are symlinks to
    `../../blobs/<hash>`), that repository's blob store."""
    resolved = root.resolve()
    roots = [resolved]
    if resolved.parent.name == "snapshots":
        roots.append(resolved.parent.parent / "blobs")
    return roots


def leads_outside(root: Path, target: Path) -> Path | None:
    """The real path of `target` when it (through symlinks) lies outside `root`; None when inside."""
    resolved = target.resolve()
    if any(resolved.is_relative_to(r) for r in allowed_roots(root)):
        return None
    return resolved


def check_inside_dir(root: Path, path: Path) -> None:
    """Refuse a file of a checkpoint directory that is a symlink leading out of it: weights, configs and
    tokenizer files are read (and copied to the output) only from inside the source."""
    outside = leads_outside(root, path)
    if outside is not None:
        raise SourceError(f"{path}: is a symlink leading outside the source directory (to {outside}); "
                          "refusing to read it")


def resolve_in_dir(index_path: Path, name: object) -> Path:
    """The weight file an index names, refusing anything outside the index's directory."""
    root = index_path.parent.resolve()
    if not isinstance(name, str) or not name or "\0" in name:
        raise SourceError(f"{index_path}: file name {str(name)[:80]!r} is not a non-empty string")
    if not name.isprintable() or len(name) > 255:
        raise SourceError(f"{index_path}: file name {name[:80]!r} is not a plausible weight file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise SourceError(f"{index_path}: refers to '{name}', a path outside its directory")
    target = root / rel
    if not target.exists():
        raise SourceError(f"{index_path}: refers to '{name}', which does not exist")
    outside = leads_outside(root, target)
    if outside is not None:
        raise SourceError(f"{index_path}: refers to '{name}', which leads outside its directory "
                          f"(to {outside})")
    if not target.resolve().is_file():
        raise SourceError(f"{index_path}: refers to '{name}', which is not a file")
    return target.absolute()


def check_regular_file(path: Path) -> None:
    """Only regular files are read: opening a FIFO blocks until a writer comes (forever), and a device or
    socket has no size to check anything against. stat() follows symlinks and never blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a directory"
                if stat.S_ISDIR(mode) else "not a file")
        raise SourceError(f"{path}: is {kind}, not a regular file; only regular files are read")


def check_not_lfs_pointer(path: Path) -> None:
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_PREFIX))
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head == LFS_PREFIX:
        raise SourceError(f"{path}: is a Git LFS pointer, not the weights (run `git lfs pull`)")


# -- remote sources (docs/remote.md) -----------------------------------------------------------------
# Only the spelling lives here, so telling a URL from a path never imports the HTTP code (sources/remote.py).
REMOTE_PREFIXES = ("http://", "https://", "hf://")


def remote_url(source) -> str | None:
    """The URL when `source` is a string spelled as one (`https://...`, `hf://org/name[@revision]`), else
    None. A Path is never a URL: Path() folds the '//' of one, so URLs travel as plain strings."""
    if isinstance(source, str) and source.lower().startswith(REMOTE_PREFIXES):
        return source
    return None


def source_argument(text: str) -> "Path | str":
    """The command line's SOURCE: a URL stays a string (a Path would fold its '//'), anything else a path."""
    return text if remote_url(text) else Path(text)
