"""`mmrec distill`: a converted MM-Rec trained to behave like its source, with the teacher streamed.

    calibration text ─► tokens [N, T] ─► teacher.embed ─► X_0
    for each layer i:  teacher layer i (alone in memory) on X_i ─► attention output A_i, output X_{i+1}
                       student block i (alone) ─► mixer stage on (X_i, A_i), block stage on (X_i, X_{i+1})
                       ─► OUT/.distill/layer-i.safetensors + journal   (what --resume continues from)
    teacher head on X_L ─► top-k logits ─► end-to-end KL of the whole student
    ─► OUT: config.json, model*.safetensors, tokenizer files, distill_report.json (written last)

Teacher forcing makes layers independent given X_i, so a resumed run redoes only the teacher's forward
passes up to the first unfinished layer and gives the same bytes (seeded, on the CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mmrec.checkpoint import (LazyStateDict, _set_parameter, checkpoint_file_paths, map_safetensors, parse_size,
                              save_pretrained, write_safetensors)
from mmrec.model import MMRecBlock, MMRecModel
from mmrec.training.outputs import non_finite_parameter
from mmrec.shards import TOKENIZER_FILES
from mmrec.training.data import load_tokenizer, read_documents, tokenize_documents
from mmrec.training.device import resolve_device
from mmrec.training.errors import DataError, TrainingError
from mmrec.training.outputs import write_json

from ..graph import SchedulerChoice, return_freed_memory_promptly
from .activations import ActivationSpace
from .end_to_end import heldout_kl, train_end_to_end
from .layerwise import LayerwiseSettings, stage_error, train_stage

STAGES = ("mixer", "block", "e2e")
WORK_DIR = ".distill"
JOURNAL = "journal.json"
REPORT = "distill_report.json"
RUN_SETTINGS = ("tokens", "seq_len", "stages", "mixer_steps", "block_steps", "e2e_steps", "batch_size",
                "lr", "e2e_lr", "top_k", "seed", "heldout_sequences")


class DistillRefused(Exception):
    """The output cannot be written as asked (exists without --resume/--overwrite, changed settings)."""


@dataclasses.dataclass
class DistillOptions:
    teacher: Path
    student: Path
    data: Sequence[Path]
    output: Path
    tokens: int = 1_000_000        # calibration tokens (cut into sequences of seq_len)
    seq_len: int = 256
    stages: str = "mixer,block,e2e"
    mixer_steps: int = 100         # per layer
    block_steps: int = 100         # per layer
    e2e_steps: int = 200
    batch_size: int = 16           # sequences per step
    lr: float = 1e-3               # layer-wise stages
    e2e_lr: float = 3e-4
    top_k: int = 64
    seed: int = 0
    heldout_sequences: int = 0     # 0: 5% of the sequences, at least 1 (scored, never trained on)
    device: str | None = None
    memory_budget: str = "2GB"     # activations beyond this go to memory-mapped files
    scheduler: SchedulerChoice = dataclasses.field(default_factory=SchedulerChoice)  # layers as dask tasks
    resume: bool = False
    overwrite: bool = False
    stop_after_layer: int | None = None  # testing: stop after this layer as if killed

    def __post_init__(self) -> None:
        self.teacher, self.student, self.output = Path(self.teacher), Path(self.student), Path(self.output)
        self.data = [Path(p) for p in self.data]

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]

    def validate(self) -> None:
        unknown = [s for s in self.stage_list if s not in STAGES]
        if unknown or not self.stage_list:
            raise ValueError(f"--stages must be a comma-separated subset of {','.join(STAGES)}, got "
                             f"{self.stages!r}")
        for name in ("tokens", "seq_len", "batch_size", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("mixer_steps", "block_steps", "e2e_steps", "heldout_sequences"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "e2e_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number greater than 0, got {value}")
        if self.tokens < 2 * self.seq_len:
            raise ValueError(f"--tokens {self.tokens} is less than two sequences of --seq-len {self.seq_len}")
        parse_size(self.memory_budget)
        if not self.data:
            raise DataError("no calibration data: give --data FILE (.txt or .jsonl) at least once")

    def settings(self) -> dict[str, Any]:
        """What defines the run: a --resume with any of it changed is refused."""
        values = dataclasses.asdict(self)
        inputs = {"teacher": str(self.teacher.resolve()), "student": str(self.student.resolve()),
                  "data": [str(p.resolve()) for p in self.data]}
        return {**inputs, **{name: values[name] for name in RUN_SETTINGS}}


# -- inputs --------------------------------------------------------------------------------------------
def _check_pair(teacher, config, options: DistillOptions) -> None:
    """The student must be a conversion of this teacher: same layers, width and vocabulary."""
    t = teacher.config
    width = getattr(t, "hidden_size", None) or getattr(t, "n_embd", None)
    checks = [("num_layers", teacher.num_layers, config.num_layers), ("model_dim", width, config.model_dim)]
    for field, want, got in checks:
        if want != got:
            raise DataError(f"--student {options.student}: its {field} is {got}, the teacher's is {want}; "
                            f"distill a conversion of this teacher (same layers and width)")
    if options.seq_len > config.memory_segment_len:
        raise DataError(f"--seq-len {options.seq_len} is longer than the student's memory_segment_len "
                        f"{config.memory_segment_len}: calibration sequences must fit between memory writes")
    if config.vocab_size < t.vocab_size:
        raise DataError(f"--student {options.student}: vocab_size {config.vocab_size} is smaller than the "
                        f"teacher's {t.vocab_size}")


def _tokenizer(options: DistillOptions, teacher_root: Path):
    """The student's tokenizer.json (what the conversion copied), which must be the teacher's own."""
    student_dir = options.student if options.student.is_dir() else options.student.parent
    ours, theirs = student_dir / "tokenizer.json", teacher_root / "tokenizer.json"
    if ours.exists() and theirs.exists() and _digest(ours) != _digest(theirs):
        raise DataError(f"tokenizer mismatch: {ours} differs from the teacher's {theirs}; the calibration "
                        f"text must be tokenized as the teacher was trained")
    return load_tokenizer(student_dir if ours.exists() else teacher_root)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def calibration_sequences(options: DistillOptions, tokenizer, vocab_size: int) -> torch.Tensor:
    """The calibration stream (documents shuffled by the seed) cut into [N, seq_len] token sequences."""
    ids = tokenize_documents(read_documents(options.data, "--data"), tokenizer, vocab_size, options.seed)
    count = min(options.tokens, ids.numel()) // options.seq_len
    if count < 2:
        raise DataError(f"--data gives {ids.numel():,} tokens: fewer than two sequences of --seq-len "
                        f"{options.seq_len}; give more text or a shorter --seq-len")
    return ids[:count * options.seq_len].view(count, options.seq_len).long()


# -- output and resume ------------------------------------------------------------------------------------
def _prepare_output(options: DistillOptions) -> dict:
    out, work = options.output, options.output / WORK_DIR
    journal_path = work / JOURNAL
    if options.resume and journal_path.exists():
        journal = json.loads(journal_path.read_text())
        if journal.get("settings") != options.settings():
            changed = sorted(k for k in options.settings() if journal["settings"].get(k) != options.settings()[k])
            raise DistillRefused(f"--resume: {out} was started with other settings ({', '.join(changed)})")
        (out / REPORT).unlink(missing_ok=True)  # the model files may be rewritten: no longer complete
        return journal
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not options.overwrite:
            raise DistillRefused(f"--output {out} exists and is not empty: pass --overwrite to replace it or "
                                 f"--resume to continue an interrupted run")
        for path in [*checkpoint_file_paths(out), out / REPORT, out / "config.json"]:
            path.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    journal = {"settings": options.settings(), "layers": {}}
    write_json(journal_path, journal)
    return journal


def check_finite(module: torch.nn.Module, what: str, dtype: torch.dtype | None = None) -> None:
    """Never write a non-finite value we computed (checked in the dtype it will be stored in): one error
    naming the tensor instead."""
    name = non_finite_parameter(module, dtype)
    if name is not None:
        raise TrainingError(f"{what}: {name} has non-finite values after training"
                            f"{f' once stored as {dtype}' if dtype else ''}; nothing was written "
                            f"(lower --lr / --e2e-lr)")


def _save_block(block: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    """A trained block, in the student's own dtype (what the output will hold; half the disk of float32)."""
    check_finite(block, path.stem, dtype)
    tensors = {name: p.detach() for name, p in block.named_parameters()}
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tmp, tensors, dtype=dtype)
    os.replace(tmp, path)


def _load_block(stored: LazyStateDict, layer: int, device) -> MMRecBlock:
    """Block `layer` of the converted student, alone, in float32 on `device`."""
    block = MMRecBlock(stored.config)
    block.load_state_dict({name: stored[f"blocks.{layer}.{name}"].float() for name, _ in block.named_parameters()},
                          strict=True)
    return block.to(device).eval()


# -- layers ----------------------------------------------------------------------------------------------
def _teacher_layer(teacher, i: int, x: torch.Tensor, attn: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    """Teacher layer i (alone in memory) on every sequence of x: its attention output and its output."""
    with teacher.layer(i) as layer:
        for a in range(0, x.shape[0], batch):
            out, branch = teacher.run_layer(layer, x[a:a + batch])
            y[a:a + batch], attn[a:a + batch] = out.float().cpu(), branch.float().cpu()


def train_layer(i: int, x: torch.Tensor, attn: torch.Tensor, y: torch.Tensor, job: dict, layer_file: Path,
                report: Callable[[dict], None]) -> dict:
    """Student block i trained on the teacher's (input, attention output, output) of layer i, written to
    `layer_file`; returns its report entry. Everything it needs is in its arguments, so it runs as well in
    this process as in a dask worker."""
    began = time.monotonic()
    stored = LazyStateDict(job["student"])
    device = _layer_device(job["device"], i)
    block = _load_block(stored, i, device)
    n, batch = job["n_train"], job["batch"]
    targets = {"mixer": attn, "block": y}

    def errors() -> dict[str, float]:
        return {s: stage_error(s, block, x[n:], targets[s][n:], device, batch) for s in ("mixer", "block")}

    before = errors()
    runs = {stage: train_stage(stage, block, x[:n], targets[stage][:n], i, job["settings"], device, report)
            for stage in ("mixer", "block")}
    after = errors()
    _save_block(block, layer_file, stored_dtype(stored))
    return {"layer": i, "mixer_mse_before": before["mixer"], "mixer_mse_after": after["mixer"],
            "block_mse_before": before["block"], "block_mse_after": after["block"], "stages": runs,
            "device": str(device), "seconds": round(time.monotonic() - began, 3)}


def _layer_device(name: str, layer: int) -> torch.device:
    """With several GPUs, layers go round-robin over them (a dask worker per GPU shares the work)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return torch.device("cuda", layer % torch.cuda.device_count())
    return device


def _finished(journal: dict, work: Path, i: int) -> bool:
    """Layer i was trained by an earlier (interrupted) run: recorded in the journal and its file there."""
    return str(i) in journal["layers"] and (work / f"layer-{i}.safetensors").exists()


def _record(journal: dict, work: Path, entry: dict, layers: int, report) -> None:
    journal["layers"][str(entry["layer"])] = entry
    write_json(work / JOURNAL, journal)
    report({"event": "layer", **entry, "layers": layers})


def _layers_in_order(teacher, space, x, journal, work, job, options, report):
    """One teacher layer and one student block at a time; the next layer starts from the teacher's output."""
    entries = []
    for i in range(teacher.num_layers):
        attn, y = space.tensor(f"attn-{i}", x.shape), space.tensor(f"x-{i + 1}", x.shape)
        _teacher_layer(teacher, i, x, attn, y, job["batch"])
        if _finished(journal, work, i):
            entries.append(journal["layers"][str(i)])
        else:
            entries.append(train_layer(i, x, attn, y, job, work / f"layer-{i}.safetensors", report))
            _record(journal, work, entries[-1], teacher.num_layers, report)
        space.release(x)
        space.release(attn)
        x = y
        if options.stop_after_layer is not None and i >= options.stop_after_layer:
            raise KeyboardInterrupt(f"stopped after layer {i} (--stop-after-layer)")
    return entries, x


def _layers_on_cluster(teacher, space, x, journal, work, job, options, report):
    """One streamed teacher pass writes every layer's activations to files; then each unfinished layer is
    a dask task (workers read the files), so layers train in parallel on a cluster or several GPUs."""
    from ..graph import Executor

    files = {}
    for i in range(teacher.num_layers):
        attn, y = space.tensor(f"attn-{i}", x.shape), space.tensor(f"x-{i + 1}", x.shape)
        _teacher_layer(teacher, i, x, attn, y, job["batch"])
        files[i] = (space.path_of(x), space.path_of(attn), space.path_of(y))
        x = y
    token = hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:12]
    graph = {}
    for i, paths in files.items():
        if not _finished(journal, work, i):
            graph[f"mmrec-distill-layer-{i}-{token}"] = (_layer_task, i, [str(p) for p in paths], tuple(x.shape),
                                                         job, str(work / f"layer-{i}.safetensors"))
    with Executor(options.scheduler) as executor:
        executor.run_tasks(graph, list(graph),
                           lambda key, entry: _record(journal, work, entry, teacher.num_layers, report))
    return [journal["layers"][str(i)] for i in range(teacher.num_layers)], x


def _layer_task(i: int, paths: list[str], shape: tuple, job: dict, layer_file: str) -> dict:
    """A dask task: train_layer on the activation files of layer i."""
    import numpy as np

    x, attn, y = (torch.from_numpy(np.memmap(p, dtype=np.float32, mode="c", shape=shape)) for p in paths)
    return train_layer(i, x, attn, y, job, Path(layer_file), lambda record: None)


# -- the run -------------------------------------------------------------------------------------------------
def distill(options: DistillOptions, progress: Callable[[dict], None] | None = None) -> dict:
    """Run every stage; returns the report (also written to OUT/distill_report.json, last)."""
    from ..sources import open_source
    from .teacher import StreamedTeacher

    options.validate()
    return_freed_memory_promptly()  # freed blocks leave the process: peak memory stays flat across layers
    report_event = progress or (lambda record: None)
    began = time.monotonic()
    device = resolve_device(options.device)
    stored = LazyStateDict(options.student)  # headers only: the config and stored dtype, read once
    config, student_dtype = stored.config, stored_dtype(stored)
    catalog = open_source(options.teacher)
    teacher = StreamedTeacher(catalog, device)
    _check_pair(teacher, config, options)
    tokenizer = _tokenizer(options, catalog.root)
    sequences = calibration_sequences(options, tokenizer, teacher.config.vocab_size)
    journal = _prepare_output(options)
    work = (options.output / WORK_DIR).resolve()  # absolute: dask workers may run elsewhere
    held = options.heldout_sequences or max(1, sequences.shape[0] // 20)
    held = min(held, sequences.shape[0] - 1)
    train_ids, held_ids = sequences[:-held], sequences[-held:]
    stages = options.stage_list
    settings = LayerwiseSettings({"mixer": options.mixer_steps if "mixer" in stages else 0,
                                  "block": options.block_steps if "block" in stages else 0},
                                 options.batch_size, options.lr, options.seed)
    space = ActivationSpace(work / "activations",
                            parse_size(options.memory_budget) if options.scheduler.kind == "threads" else 0)
    N, T, D = sequences.shape[0], options.seq_len, config.model_dim
    batch = options.batch_size
    x = space.tensor("x-0", (N, T, D))
    with teacher.embedding_loaded():
        for a in range(0, N, batch):
            x[a:a + batch] = teacher.embed(sequences[a:a + batch]).float().cpu()
    job = dict(student=str(options.student.resolve()), n_train=train_ids.shape[0], settings=settings,
               device=str(device), batch=batch)
    if options.scheduler.kind == "threads":
        layer_reports, x = _layers_in_order(teacher, space, x, journal, work, job, options, report_event)
    else:
        layer_reports, x = _layers_on_cluster(teacher, space, x, journal, work, job, options, report_event)
    e2e = {"steps": 0}
    student = None
    if "e2e" in stages and options.e2e_steps > 0:
        student = _student_with_blocks(options, work, teacher.num_layers, device, torch.float32)
        k = min(options.top_k, teacher.config.vocab_size)
        top_values, top_index = space.tensor("top_values", (N, T, k)), space.tensor("top_index", (N, T, k),
                                                                                   torch.int32)
        with teacher.head_loaded():
            for a in range(0, N, batch):
                values, index = teacher.logits(x[a:a + batch]).topk(k, dim=-1)
                top_values[a:a + batch], top_index[a:a + batch] = values.cpu(), index.int().cpu()
        n_train = train_ids.shape[0]
        kl_before = heldout_kl(student, held_ids, top_values[n_train:], top_index[n_train:], device, batch)
        e2e = train_end_to_end(student, train_ids, top_values[:n_train], top_index[:n_train],
                               steps=options.e2e_steps, batch_size=options.batch_size, lr=options.e2e_lr,
                               seed=options.seed, device=device, report=report_event)
        e2e.update(kl_before=kl_before,
                   kl_after=heldout_kl(student, held_ids, top_values[n_train:], top_index[n_train:], device, batch))
        if e2e["skipped_steps"] == e2e["steps"]:
            raise TrainingError("end-to-end distillation: every step had a non-finite loss or gradient")
        check_finite(student, "end-to-end distillation", student_dtype)
    report = {"teacher": str(options.teacher), "student": str(options.student), "output": str(options.output),
              "device": str(device), "settings": options.settings(), "calibration_sequences": N,
              "calibration_tokens": N * T, "heldout_sequences": held, "layers": layer_reports,
              "end_to_end": e2e, "activations_spilled_to_disk": bool(space.spilled),
              "seconds": round(time.monotonic() - began, 3)}
    if student is None:
        student = _student_with_blocks(options, work, teacher.num_layers, torch.device("cpu"), None)
    _write_output(student, options, catalog.root, report, student_dtype)
    return report


def _student_with_blocks(options: DistillOptions, work: Path, layers: int, device, dtype) -> MMRecModel:
    """The converted student with every distilled block in place. On the CPU with dtype None nothing is
    copied (memory-map views of the student and of the layer files), so writing it needs no RAM for the
    model; for the end-to-end stage it is whole on its device in `dtype`."""
    model = MMRecModel.from_pretrained(options.student, device=device, dtype=dtype)
    for i in range(layers):
        for name, tensor in map_safetensors(work / f"layer-{i}.safetensors").items():
            _set_parameter(model.blocks[i], name, tensor.to(device=device, dtype=dtype))
    return model


def _write_output(student: MMRecModel, options: DistillOptions, teacher_root: Path, report: dict,
                  dtype: torch.dtype) -> None:
    """Model files, then tokenizer files, then the report: a directory without the report is unfinished."""
    out = options.output
    save_pretrained(student, out, max_shard_size="5GB", dtype=dtype)
    student_dir = options.student if options.student.is_dir() else options.student.parent
    for name in TOKENIZER_FILES:
        for folder in (student_dir, teacher_root):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
                break
    write_json(out / REPORT, report)
    # The journal stays (what was done); activations and blocks, now in the model files, go.
    shutil.rmtree(out / WORK_DIR / "activations", ignore_errors=True)
    for layer_file in (out / WORK_DIR).glob("layer-*.safetensors"):
        layer_file.unlink()


def stored_dtype(stored: LazyStateDict) -> torch.dtype:
    """The dtype the student's checkpoint stores (its first tensor's)."""
    return stored[next(iter(stored))].dtype
