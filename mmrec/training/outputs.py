"""What a training run writes: JSON files, the loss log and plot, the model, the resumable train_state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import checkpoint_file_paths
from ..model import MMRecModel
from .device import rng_state, state_to_dict

TRAIN_STATE = "train_state"
LOSS_LOG = "loss_log.jsonl"
LOSS_PLOT = "loss.png"


def write_json(path: Path, data: Any) -> None:
    """Written to a .tmp file and renamed, so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class NonFiniteWeights(ValueError):
    """The model holds NaN or inf weights: refused rather than written."""


def non_finite_parameter(module: torch.nn.Module, dtype: torch.dtype | None = None) -> str | None:
    """The name of the first floating parameter holding a NaN or inf (once cast to `dtype`, the dtype it will
    be stored in, when given), else None: fine-tuning and distillation never write such a value."""
    for name, param in module.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param.detach().to(dtype or param.dtype)).all()):
            return name
    return None


def check_finite(model: MMRecModel) -> None:
    """Raise NonFiniteWeights naming the first parameter that holds a NaN or inf (nothing is written then)."""
    name = non_finite_parameter(model)
    if name is not None:
        raise NonFiniteWeights(f"weight {name!r} became non-finite (NaN or inf) during training; nothing "
                               "was saved; lower --lr or set --grad-clip")


def write_model(model: MMRecModel, directory: Path, max_shard_size: str, dtype=None) -> None:
    """The model's files in `directory` (`from_pretrained` reads them), replacing any earlier model there."""
    check_finite(model)
    tmp = directory.with_name(directory.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size, dtype=dtype)
    directory.mkdir(parents=True, exist_ok=True)
    for path in checkpoint_file_paths(directory):
        path.unlink()
    for path in tmp.iterdir():
        os.replace(path, directory / path.name)
    tmp.rmdir()


def save_train_state(output: Path, model: MMRecModel, optimizer: torch.optim.Optimizer, state,
                     trainer_state: dict[str, Any], max_shard_size: str) -> None:
    """Everything a resume needs, written to train_state.tmp and then swapped in whole: the float32 model,
    optimizer.pt, recurrent_state.pt (carried state and RNG states) and trainer_state.json (`trainer_state`)."""
    check_finite(model)
    tmp, final, old = output / (TRAIN_STATE + ".tmp"), output / TRAIN_STATE, output / (TRAIN_STATE + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)  # float32 master weights
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"state": state_to_dict(state) if state is not None else None, "rng": rng_state()},
               tmp / "recurrent_state.pt")
    write_json(tmp / "trainer_state.json", trainer_state)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_train_state(output: Path) -> Path | None:
    """The train_state/ directory to resume from, if `output` holds one."""
    for name in (TRAIN_STATE, TRAIN_STATE + ".old"):  # .old: a kill between the two renames
        candidate = output / name
        if (candidate / "trainer_state.json").exists():
            return candidate
    return None


def read_log(output: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The records of loss_log.jsonl (up to `up_to_step`: what a resume keeps)."""
    path = output / LOSS_LOG
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if up_to_step is None or record["step"] <= up_to_step:
            records.append(record)
    return records


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """loss.png: training loss (raw and smoothed) and held-out loss against the step. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
        smooth = moving_average(list(losses), max(1, len(losses) // 25))
        ax.plot(steps, smooth, color="tab:blue", label="train (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", markersize=3, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
