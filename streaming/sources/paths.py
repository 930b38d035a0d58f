"""File checks shared by every layout: index entries that stay inside their directory, LFS pointers."""

from __future__ import annotations

from pathlib import Path

from .catalog import SourceError

LFS_PREFIX = b"version https://git-lfs"


def resolve_in_dir(index_path: Path, name: object) -> Path:
    """The weight file an index names, refusing anything outside the index's directory."""
    root = index_path.parent.resolve()
    if not isinstance(name, str) or not name:
        raise SourceError(f"{index_path}: file name {name!r} is not a non-empty string")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise SourceError(f"{index_path}: refers to '{name}', a path outside its directory")
    target = root / rel
    if not target.exists():
        raise SourceError(f"{index_path}: refers to '{name}', which does not exist")
    resolved = target.resolve()
    if not resolved.is_relative_to(root):
        raise SourceError(f"{index_path}: refers to '{name}', which leads outside its directory "
                          f"(to {resolved})")
    if not resolved.is_file():
        raise SourceError(f"{index_path}: refers to '{name}', which is not a file")
    return target.absolute()


def check_not_lfs_pointer(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_PREFIX))
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head == LFS_PREFIX:
        raise SourceError(f"{path}: is a Git LFS pointer, not the weights (run `git lfs pull`)")
