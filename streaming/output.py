"""The output directory's safety rules: refusals, the lock, the resume journal, and the final commit.

While a run is in progress everything lives in a hidden state directory beside the output
(`.mmrec-convert/` in the output directory): shard files as `<name>.partial`, `run.json` (what is being
converted, to refuse a resume with changed inputs or options), `journal.jsonl` (shards proven complete:
written, fsynced, checksummed) and `lock`. Shards get their final names only once every shard is complete;
then come the index, `config.json` and `conversion_report.json`, so a directory holding a report is
complete, and one without it never looks complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from mmrec.shards import checkpoint_file_paths

from .tasks import naming_os_errors

STATE_DIR = ".mmrec-convert"
REPORT_NAME = "conversion_report.json"


class OutputRefused(RuntimeError):
    """The output cannot be written as asked (exists, locked, inside the source, changed inputs)."""


def check_not_inside_source(source: Path, output: Path) -> None:
    from .sources.paths import remote_url

    if remote_url(source) is not None:
        return  # a URL source: nothing local to protect
    source = Path(source)
    if not source.exists():
        return  # opening the source says so, naming it
    src, out = source.resolve(), output.resolve()
    if src.is_dir():
        inside = out == src or src in out.parents
    else:  # a single file: its directory may hold other outputs, but never ours directly
        inside = out == src or (out == src.parent and out.suffix != ".safetensors")
    if inside:
        raise OutputRefused(f"--output {output} is inside the source {source}; the source is never written to")
    if out in src.parents and src.is_dir():
        raise OutputRefused(f"--output {output} contains the source {source}; choose another output")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:  # ENOSPC from write/flush carries no file name: naming_os_errors names it
        with naming_os_errors(str(path)), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputState:
    """The state directory of one output: lock, run identity, journal of complete shards."""

    def __init__(self, directory: Path, single_file: str | None):
        self.directory = directory
        self.single_file = single_file
        name = STATE_DIR if single_file is None else f".{single_file}{STATE_DIR}"
        self.path = directory / name
        self._lock_fd: int | None = None

    # -- what already exists ----------------------------------------------------------------------
    def stale_outputs(self, aux_names: list[str]) -> list[Path]:
        """Every file a previous conversion into this output may have left, whatever its shard count."""
        if self.single_file:
            return [self.directory / self.single_file, self.directory / self.report_name]
        return [*checkpoint_file_paths(self.directory), self.directory / REPORT_NAME,
                *(self.directory / n for n in aux_names)]

    @property
    def report_name(self) -> str:
        if self.single_file:
            return self.single_file.removesuffix(".safetensors") + "." + REPORT_NAME
        return REPORT_NAME

    def output_exists(self) -> bool:
        if self.single_file:
            return (self.directory / self.single_file).exists() or self.path.exists()
        return self.directory.exists() and any(self.directory.iterdir())

    @property
    def shown(self) -> Path:
        """The output as the user named it (the directory, or the single file)."""
        return self.directory / self.single_file if self.single_file else self.directory

    def locked_by_another(self) -> bool:
        """Whether a live run holds this output's lock. Probes an existing lock file only: creates nothing."""
        if self._lock_fd is not None:
            return False
        try:
            fd = os.open(self.path / "lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the probe's own lock
        return False

    def check(self, resume: bool, overwrite: bool, identity: dict | None = None) -> None:
        """Raise OutputRefused if a run with these flags would be refused; reads only, writes nothing.

        What `--dry-run` reports, and the first thing `prepare` does. The cases, in order: the output is a
        file where a directory is needed; a live run holds it (the lock); it holds an interrupted conversion
        (`--resume` continues it, refused if `identity` differs from the recorded one); a finished one
        (nothing to resume); anything else (only `--overwrite` writes into it).
        """
        if self.directory.exists() and not self.directory.is_dir():
            raise OutputRefused(f"--output {self.directory} is a file, not a directory (a single-file output "
                                "must end in .safetensors)")
        if not self.output_exists():
            return
        if self.locked_by_another():
            raise self._busy()
        interrupted = self.path.exists()  # also when killed between the report and the state's removal
        finished = not interrupted and (self.directory / self.report_name).exists()
        if resume:
            if interrupted:
                if identity is not None:
                    self._check_identity(identity)
                return
            if finished:
                raise OutputRefused(f"cannot --resume {self.shown}: it holds a finished conversion "
                                    f"({self.report_name}), there is nothing to resume; "
                                    + ("drop --resume to replace it" if overwrite else
                                       "pass --overwrite to convert again"))
            raise OutputRefused(f"cannot --resume {self.shown}: it holds no interrupted conversion")
        if overwrite:
            return
        if interrupted:
            raise OutputRefused(f"--output {self.shown} holds an interrupted conversion; pass --resume to "
                                "continue it or --overwrite to start again")
        if finished:
            raise OutputRefused(f"--output {self.shown} already holds a finished conversion "
                                f"({self.report_name}); pass --overwrite to replace it, or choose another output")
        if self.single_file:
            raise OutputRefused(f"--output {self.shown} exists; pass --overwrite to replace it")
        raise OutputRefused(f"--output {self.shown} exists and is not empty; pass --overwrite to write into it "
                            "(a previous conversion's files are replaced, other files kept) or choose another "
                            "output")

    def _busy(self) -> OutputRefused:
        return OutputRefused(f"another conversion is writing to {self.directory}; refusing to run two at once")

    def _check_identity(self, identity: dict) -> None:
        if not (self.path / "run.json").exists():
            return  # stopped between taking the lock and recording the run: nothing was written to keep
        recorded = self._read_identity()
        if recorded != identity:
            changed = sorted(k for k in set(identity) | set(recorded or {})
                             if (recorded or {}).get(k) != identity.get(k))
            raise OutputRefused(f"cannot --resume {self.shown}: the {', '.join(changed)} changed "
                                "since the interrupted run; use --overwrite to start again")

    # -- lifecycle ------------------------------------------------------------------------------------
    def prepare(self, identity: dict, resume: bool, overwrite: bool, shard_names: list[str],
                aux_names: list[str]) -> set[str]:
        """Create or reuse the state dir; return the shards a resume may keep."""
        self.check(resume, overwrite)
        if self.output_exists():
            self._lock()  # held from here on: nobody else can start on this output meanwhile
            if resume:  # check() let it through: an interrupted conversion is there
                try:  # compared under the lock: nobody can rewrite run.json meanwhile
                    self._check_identity(identity)
                except OutputRefused:
                    self.unlock()
                    raise
                if (self.path / "run.json").exists():
                    return self._complete_shards(shard_names)
                # no run recorded yet (stopped right after taking the lock): this run starts the state, and
                # like an --overwrite removes what an earlier conversion left (the stop may have come first)
            for path in self.stale_outputs(aux_names):
                if path.is_file():
                    path.unlink()
        self._lock()
        self._clear_state()
        write_atomic(self.path / "run.json", json.dumps(identity, indent=2, sort_keys=True))
        return set()

    def _clear_state(self) -> None:
        """Empty the state directory but keep its lock file (which we hold)."""
        for path in self.path.iterdir():
            if path.name != "lock":
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _lock(self) -> None:
        if self._lock_fd is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy() from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_identity(self) -> dict | None:
        try:
            return json.loads((self.path / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    # -- journal --------------------------------------------------------------------------------------
    def partial_path(self, shard: str) -> Path:
        return self.path / (shard + ".partial")

    def record_shard(self, shard: str, checksums: dict[str, str]) -> None:
        line = json.dumps({"shard": shard, "checksums": checksums}, sort_keys=True)
        path = self.path / "journal.jsonl"
        with naming_os_errors(path), open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def journal(self) -> dict[str, dict[str, str]]:
        entries = {}
        try:
            lines = (self.path / "journal.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return entries
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill: that shard is simply redone
            entries[entry["shard"]] = entry["checksums"]
        return entries

    def _complete_shards(self, shard_names: list[str]) -> set[str]:
        """Shards the journal proves complete and whose file is still there (partial or already renamed)."""
        journal = self.journal()
        keep = set()
        for shard in shard_names:
            if shard in journal and (self.partial_path(shard).exists() or (self.directory / shard).exists()):
                keep.add(shard)
        return keep

    # -- commit ---------------------------------------------------------------------------------------
    def commit(self, shard_names: list[str], files: dict[str, str], copies: list[Path]) -> None:
        """Give shards their final names, then write the small files, report last; drop the state."""
        for shard in shard_names:
            partial = self.partial_path(shard)
            if partial.exists():
                os.replace(partial, self.directory / shard)
        for path in copies:
            with naming_os_errors(self.directory / path.name):
                shutil.copyfile(path, self.directory / path.name)
        for name, text in files.items():
            write_atomic(self.directory / name, text)
        fsync_dir(self.directory)
        self._clear_state()  # still locked: the lock goes last
        (self.path / "lock").unlink(missing_ok=True)
        self.path.rmdir()
        self.unlock()
