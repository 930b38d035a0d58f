"""`mmrec verify`: prove a converted checkpoint is whole and holds the bytes its report promises.

Checks, in order: index <-> shard headers (every indexed tensor in the named file, nothing extra); file
sizes (headers are validated and no trailing bytes); config.json <-> tensor names and shapes (the runtime's
schema); every tensor's checksum against conversion_report.json; and with a source, every transferred
tensor recomputed from the source through its recorded recipe and compared byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmrec.shards import CONFIG_METADATA_KEY, INDEX_NAME
from mmrec.config import MMRecConfig
from mmrec.safetensors_format import SafetensorsFormatError, read_header
from mmrec.schema import parameter_specs

from .layout import rows_of
from .output import REPORT_NAME, STATE_DIR
from .plan.model import TensorPlan
from .sources.catalog import SourceError, load_json
from .checksums import ALGORITHM as CHECKSUM_ALGORITHM, WHOLE_TENSOR_ALGORITHM, file_checksum


@dataclasses.dataclass
class VerifyResult:
    output: str
    files: int = 0
    tensors: int = 0
    checksums_checked: int = 0
    recomputed: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ok": self.ok}


def _locate(output: Path, problems: list[str]) -> tuple[list[Path], tuple[Path, dict] | None, Path]:
    """(shard files, (index path, its JSON) or None, report path) of an output directory or single file. An
    index that cannot be read, or names a file outside the directory, is a problem, never followed."""
    if output.is_file():
        return [output], None, output.with_name(output.name.removesuffix(".safetensors") + "." + REPORT_NAME)
    index = output / INDEX_NAME
    if not index.exists():
        return sorted(output.glob("*.safetensors")), None, output / REPORT_NAME
    index_data, problem = _read_json_object(index, _index_shape_problem)
    if problem:
        problems.append(problem)
        return [], None, output / REPORT_NAME
    names = list(dict.fromkeys(index_data["weight_map"].values()))
    files = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            problems.append(f"{index}: names a file outside the checkpoint: {name!r}")
        else:
            files.append(output / name)
    return files, (index, index_data), output / REPORT_NAME


def verify(output: str | Path, source: str | Path | None = None, block_bytes: int = 64 << 20) -> VerifyResult:
    output = Path(output)
    result = VerifyResult(str(output))
    if not output.exists():
        result.problems.append(f"{output}: does not exist")
        return result
    files, index, report_path = _locate(output, result.problems)
    if not files:
        result.problems.append(f"{output}: no .safetensors files")
        return result
    spans, headers = {}, {}
    for file in files:
        try:
            header = read_header(file)
        except (SafetensorsFormatError, FileNotFoundError) as exc:
            result.problems.append(str(exc))
            continue
        headers[file] = header
        end = max((s.end for s in header.tensors.values()), default=header.data_start)
        if header.file_size != end:
            result.problems.append(f"{file}: {header.file_size - end} bytes after the last tensor")
        for name, span in header.tensors.items():
            if name in spans:
                result.problems.append(f"tensor '{name}' is stored in both {spans[name][0].name} and {file.name}")
            spans[name] = (file, span)
    result.files, result.tensors = len(headers), len(spans)
    missing_report = None if report_path.exists() else _missing_report(output, report_path, headers, spans)
    if missing_report is not None and missing_report[1]:  # a source checkpoint: nothing else to say about it
        result.problems[:] = [missing_report[0]]
        return result
    if index is not None:
        _check_index(*index, spans, result)
    config = _config(output, files, headers, result)
    if config is not None:
        _check_schema(config, spans, result)
    report, problem = (None, missing_report[0]) if missing_report else _read_json_object(report_path,
                                                                                        _report_shape_problem)
    if problem:
        result.problems.append(problem)
    else:
        _check_checksums(report, spans, result)
        if source is not None:
            _recompute(report, spans, source, block_bytes, result)
    return result


def _missing_report(output: Path, report_path: Path, headers: dict, spans: dict) -> tuple[str, bool]:
    """Why there is no conversion report, in words: (message, whether the output is a source checkpoint)."""
    state = output / STATE_DIR if output.is_dir() else output.with_name(f".{output.name}{STATE_DIR}")
    if state.exists():
        return (f"{report_path}: missing; the conversion did not finish (rerun `mmrec shard-convert` with "
                "--resume to complete it)", False)
    model_type = None
    if output.is_dir():
        try:
            model_type = json.loads((output / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError, RecursionError):
            model_type = None
    elif any(CONFIG_METADATA_KEY in h.metadata for h in headers.values()):
        model_type = "mmrec"
    if (model_type is not None and model_type != "mmrec") or (model_type is None and spans
                                                              and "embedding.weight" not in spans):
        kind = f" (model_type {model_type!r})" if isinstance(model_type, str) else ""
        return (f"{output}: holds no conversion report ({report_path.name}); it looks like a source "
                f"checkpoint{kind}, not a converted one: convert it first with `mmrec shard-convert`", True)
    return (f"{report_path}: missing, so no checksum can be checked (the output was not written by `mmrec "
            "shard-convert`, or its report was removed)", False)


def _read_json_object(path: Path, shape_problem) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None), or (None, one line naming the file and what is wrong with it):
    unreadable, not JSON, or of the wrong shape (`shape_problem(data)` says which field)."""
    try:
        data = load_json(path)
    except SourceError as exc:
        return None, str(exc)
    problem = shape_problem(data)
    return (None, f"{path}: {problem}") if problem else (data, None)


def _index_shape_problem(index: dict) -> str | None:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return "not a valid index ('weight_map' must map tensor names to file names)"
    if not isinstance(index.get("metadata", {}), dict):
        return "not a valid index ('metadata' must be an object)"
    return None


def _report_shape_problem(report: dict) -> str | None:
    tensors = report.get("tensors", {})
    if not isinstance(tensors, dict) or not all(isinstance(e, dict) for e in tensors.values()):
        return "not a valid conversion report ('tensors' must map tensor names to objects)"
    if not isinstance(report.get("checksum_algorithm", ""), str):
        return "not a valid conversion report ('checksum_algorithm' must be a string)"
    seed = report.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        return "not a valid conversion report ('seed' must be a whole number from 0 to 2^64 - 1)"
    return None


def _check_index(index_path: Path, index: dict, spans: dict, result: VerifyResult) -> None:
    weight_map = index["weight_map"]
    for name, file_name in weight_map.items():
        if name not in spans:
            result.problems.append(f"{index_path.name}: '{name}' is indexed in {file_name} but not stored there")
        elif spans[name][0].name != file_name:
            result.problems.append(f"{index_path.name}: '{name}' is indexed in {file_name} but stored in "
                                   f"{spans[name][0].name}")
    for name in spans.keys() - weight_map.keys():
        result.problems.append(f"{index_path.name}: '{name}' is stored but not indexed")
    total = sum(span.nbytes for _, span in spans.values())
    if index.get("metadata", {}).get("total_size") != total:
        result.problems.append(f"{index_path.name}: total_size {index.get('metadata', {}).get('total_size')} "
                               f"!= {total} bytes of tensors")


def _config(output: Path, files: list[Path], headers: dict, result: VerifyResult) -> MMRecConfig | None:
    try:
        if output.is_dir():
            return MMRecConfig.load(output)
        header = headers.get(files[0])
        return MMRecConfig.from_dict(json.loads(header.metadata[CONFIG_METADATA_KEY]))
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as exc:
        result.problems.append(f"{output}: no usable config ({exc})")
        return None


def _check_schema(config: MMRecConfig, spans: dict, result: VerifyResult) -> None:
    for spec in parameter_specs(config):
        if spec.name in spans and spans[spec.name][1].shape != spec.shape:
            result.problems.append(f"tensor '{spec.name}' has shape {list(spans[spec.name][1].shape)}, the config "
                                   f"says {list(spec.shape)}")
    known = {spec.name for spec in parameter_specs(config, include_tied=True)}
    for name in spans.keys() - known:
        result.problems.append(f"tensor '{name}' is not an MM-Rec parameter")


VERIFY_THREADS = 4  # reads in flight: keeps a disk's queue busy while another thread hashes


def _check_checksums(report: dict, spans: dict, result: VerifyResult) -> None:
    algorithm = report.get("checksum_algorithm", WHOLE_TENSOR_ALGORITHM)
    if algorithm not in (CHECKSUM_ALGORITHM, WHOLE_TENSOR_ALGORITHM):
        result.problems.append(f"checksum_algorithm {algorithm!r} of the report is not one this mmrec knows "
                               "(written by a newer version?)")
        return
    jobs = []
    for name, entry in report.get("tensors", {}).items():
        if name not in spans:
            result.problems.append(f"tensor '{name}' is in the report but not in the checkpoint")
        else:
            jobs.append((name, entry.get("checksum"), *spans[name]))
    jobs.sort(key=lambda job: (str(job[2]), job[3].start))  # file order: reads stay sequential

    def matches(job) -> bool:
        _, expected, file, span = job
        _, row_bytes = rows_of(span.shape, span.nbytes)
        return expected == file_checksum(str(file), span.start, span.end, row_bytes, algorithm)

    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        for job, ok in zip(jobs, pool.map(matches, jobs)):
            if not ok:
                result.problems.append(f"tensor '{job[0]}' in {job[2].name}: bytes do not match the report's "
                                       "checksum")
            result.checksums_checked += 1


def _recompute(report: dict, spans: dict, source: str | Path, block_bytes: int, result: VerifyResult) -> None:
    """Recompute each transferred tensor from the source with its recorded recipe and compare bytes."""
    from .sources import open_source
    from .transforms import check_recipe

    catalog = open_source(source)
    seed = report.get("seed", 0)
    for name, entry in report.get("tensors", {}).items():
        if entry.get("kind") == "init" or name not in spans:
            continue
        try:
            plan = TensorPlan.from_dict({"name": name, **entry})
            check_recipe(plan)
        except (KeyError, TypeError, ValueError) as exc:
            result.problems.append(f"tensor '{name}': its recipe in the report is not valid ({exc}); "
                                   "cannot recompute it")
            continue
        missing = [s for s in plan.sources if s not in catalog.tensors]
        if missing:
            result.problems.append(f"tensor '{name}': the source {source} has no tensor '{missing[0]}' that its "
                                   "recipe reads (another source than the conversion's?)")
            continue
        try:
            _compare_rows(plan, catalog, spans[name], seed, block_bytes, result)
        except (KeyError, TypeError, ValueError) as exc:  # a recipe that does not fit this source's tensors
            result.problems.append(f"tensor '{name}': cannot recompute it from {source} ({exc})")
            continue
        result.recomputed += 1


def _compare_rows(plan: TensorPlan, catalog, stored, seed: int, block_bytes: int, result: VerifyResult) -> None:
    """Recompute `plan`'s rows block by block and compare them with the bytes stored at `stored`."""
    import torch

    from .transforms import materialize_rows, rows_per_block

    file, span = stored
    rows, row_bytes = rows_of(plan.shape, span.nbytes)
    step = rows_per_block(plan, block_bytes)
    with open(file, "rb") as f:
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            expected = materialize_rows(plan, catalog, start, stop, seed).reshape(-1).view(torch.uint8)
            f.seek(span.start + start * row_bytes)
            if f.read((stop - start) * row_bytes) != expected.numpy().tobytes():
                result.problems.append(f"tensor '{plan.name}' rows {start}-{stop}: differ from the source "
                                       f"recomputed through its recipe")
                return
