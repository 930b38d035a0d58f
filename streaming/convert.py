"""One conversion, end to end: source headers -> analysis -> plan -> layout -> dask graph -> shards ->
index/config/report. `convert()` is what `mmrec shard-convert` and the Python API call."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import sys
import threading
import time
from pathlib import Path

from mmrec.schema import INIT_FORMAT
from mmrec.shards import INDEX_NAME, index_json, parse_size

from .analysis import analyze
from .checksums import ALGORITHM as CHECKSUM_ALGORITHM
from .graph import Executor, SchedulerChoice, build_graph
from .layout import OutputLayout, output_paths, plan_layout
from .output import OutputState, check_not_inside_source
from .plan import build_plan
from .plan.model import ConversionPlan
from .progress import Progress
from .report import build_report
from .sources import open_source, remote_url
from .tasks import prepare_shard, zero_init
from .transforms import copy_range

DEFAULT_MEMORY_BUDGET = "512MB"


@dataclasses.dataclass
class ConvertOptions:
    source: Path | str  # a path, or a URL as a string (docs/remote.md)
    output: Path
    overrides: dict = dataclasses.field(default_factory=dict)  # vocab_size, model_dim, ... (the target size options)
    mapping: str = "default"
    mapping_file: Path | None = None
    layer_map: str = "first"
    strict: bool = False
    initialize_new: bool = True
    dtype: str | None = None
    seed: int = 0
    init: str | None = None  # conversion init mode (plan/init_modes.py); None = the default
    max_shard_size: str = "5GB"
    memory_budget: str = DEFAULT_MEMORY_BUDGET
    scheduler: SchedulerChoice = dataclasses.field(default_factory=SchedulerChoice)
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    # a ModelWeightConverter subclass instance (the Python API's extension hook, docs/conversion.md)
    converter: object | None = None


def make_plan(options: ConvertOptions):
    """Headers only: the catalog, its analysis and the plan (what `--dry-run` and `mmrec plan` show)."""
    catalog = open_source(options.source)
    analysis = analyze(catalog)
    plan = build_plan(catalog, analysis, options.overrides, mapping=options.mapping,
                      mapping_file=options.mapping_file, layer_map=options.layer_map, strict=options.strict,
                      initialize_new=options.initialize_new, dtype=options.dtype, seed=options.seed,
                      converter=options.converter, init=options.init)
    return catalog, analysis, plan


def chunk_bytes_for(options: ConvertOptions, concurrency: int) -> int:
    """Per-task block size: the memory budget shared by the tasks that run at once, with room for the
    intermediates each block needs (materialize_rows budgets those within the block)."""
    budget = parse_size(options.memory_budget)
    return max(1 << 20, budget // (4 * max(1, concurrency)))


def run_identity(plan: ConversionPlan, layout: OutputLayout, catalog) -> dict:
    """What must not change between an interrupted run and its --resume.

    Mount points and the directory the command runs from may change (another node of a batch job):
    absolute paths are left out; the source's fingerprint already covers its files' names and contents.
    """
    portable = plan.to_dict()
    portable["source_analysis"] = {k: v for k, v in portable["source_analysis"].items() if k != "files"}
    portable["options"] = {k: v for k, v in portable["options"].items() if k != "mapping_file"}
    digest = hashlib.sha256(json.dumps(portable, sort_keys=True).encode()).hexdigest()
    shards = hashlib.sha256(b"".join(s.header for s in layout.shards)).hexdigest()
    return {"source": catalog.fingerprint(), "plan": digest, "layout": shards,
            "format": f"checksums {CHECKSUM_ALGORITHM}, init {INIT_FORMAT}"}


def convert(options: ConvertOptions) -> dict:
    """Run a conversion; returns the report (also written to the output)."""
    started = time.monotonic()
    check_not_inside_source(options.source, options.output)
    catalog, analysis, plan = make_plan(options)
    planned = time.monotonic()
    directory, single = output_paths(options.output)
    layout = plan_layout(plan, parse_size(options.max_shard_size), single)
    shard_names = [s.file_name for s in layout.shards]
    aux = [] if single else list(catalog.aux_files)
    identity = run_identity(plan, layout, catalog)
    with Executor(options.scheduler) as executor:  # reach the cluster before touching the output
        state = OutputState(directory, single)
        keep = state.prepare(identity, options.resume, options.overwrite, shard_names, [p.name for p in aux])
        try:
            token = hashlib.sha256(json.dumps([identity, str(directory.resolve()), single]).encode())
            checksums = _write_shards(options, plan, layout, catalog, state, keep, executor,
                                      token.hexdigest()[:16], identity["source"])
            written = time.monotonic()
            timings = {"plan_seconds": planned - started, "write_seconds": written - planned,
                       "bytes_written": layout.total_tensor_bytes, "bytes_read": _bytes_read(plan, catalog),
                       "resumed_shards": len(keep), "scheduler": options.scheduler.kind,
                       "concurrency": executor.concurrency}
            elapsed = max(written - started, 1e-9)
            timings["total_seconds"] = elapsed
            timings["throughput_bytes_per_second"] = (timings["bytes_written"] + timings["bytes_read"]) / elapsed
            report = build_report(plan, checksums, timings)
            report["output"] = {"shards": shard_names, "single_file": single is not None}
            state.commit(shard_names, _small_files(plan, layout, state, report), aux)
        finally:
            state.unlock()
    return report


def _write_shards(options, plan, layout, catalog, state, keep, executor, run_token,
                  fingerprint) -> dict[str, str]:
    todo = [name for name in (s.file_name for s in layout.shards) if name not in keep]
    journal = state.journal()
    checksums = {name: digest for shard in keep for name, digest in journal[shard].items()}
    for shard in (s for s in layout.shards if s.file_name in todo):  # first bytes out before any heavy import
        prepare_shard(str(state.partial_path(shard.file_name)), shard.header, shard.size)
    copies = {tp.name: copy_range(tp, catalog) for tp in plan.tensors}
    if executor.client is None and any(copies[tp.name] is None and not zero_init(tp) for tp in plan.tensors):
        # computed tensors need torch (~1 s to import): start now, while the first copies run
        threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()
    source = remote_url(options.source) or str(Path(options.source).resolve())  # what each worker reopens
    graph, keys = build_graph(plan, layout, state.path, todo, source,
                              fingerprint, chunk_bytes_for(options, executor.concurrency), copies, run_token)
    done_bytes = sum(layout.slots[n].end - layout.slots[n].start for n in checksums)
    progress = Progress(layout.total_tensor_bytes, len(layout.slots), done_bytes, len(checksums),
                        quiet=options.quiet)
    shard_of = {name: slot.shard for name, slot in layout.slots.items()}

    def on_done(key, result):
        if key in keys.writes:
            progress.advance(nbytes=keys.writes[key][1])
        elif key in keys.checksums:
            checksums[keys.checksums[key]] = result
            progress.advance(tensors=1)
        elif key in keys.seals:  # the shard is on disk: the journal may now call it complete
            shard = keys.seals[key]
            state.record_shard(shard, {n: checksums[n] for n, s in shard_of.items() if s == shard})

    caller_threads = _torch_threads()  # tasks run torch single-threaded in this process (threaded scheduler)
    try:
        executor.run(graph, keys, on_done)
    finally:
        progress.close()
        if caller_threads is not None:
            import torch

            torch.set_num_threads(caller_threads)
    return checksums


def _torch_threads() -> int | None:
    """torch's thread count when the caller had already imported torch (the Python API), else None."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None and hasattr(torch, "get_num_threads") else None


def _bytes_read(plan, catalog) -> int:
    names = {name for tp in plan.tensors for name in tp.sources}
    return sum(catalog.tensors[n].nbytes for n in names if n in catalog.tensors)


def _small_files(plan, layout, state, report) -> dict[str, str]:
    files = {}
    if not layout.single_file:
        if len(layout.shards) > 1:
            files[INDEX_NAME] = index_json(layout.weight_map(), layout.total_tensor_bytes)
        files["config.json"] = json.dumps(plan.target_config, indent=2, sort_keys=True) + "\n"
    files[state.report_name] = json.dumps(report, indent=2) + "\n"  # last: its presence means complete
    return files
