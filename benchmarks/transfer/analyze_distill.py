"""Summarise the distillation experiment's result files (results/distill/*.json) into summary.md and plots.

    python benchmarks/transfer/analyze_distill.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results" / "distill"


def load(name: str) -> dict | None:
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else None


def table(summary: dict) -> list[str]:
    rows = ["| arm | held-out loss | kept | mixing recovered | long-context loss | max abs(h) over 16k tokens |",
            "|---|---|---|---|---|---|"]
    for name, v in summary.items():
        long = f"{v['long_loss']:.3f}" if "long_loss" in v else ""
        h = f"{v['long_max_abs_h']:.3g}" if "long_max_abs_h" in v else ""
        rows.append(f"| {name} | {v['loss']:.3f} | {v['kept']:.1%} | {v['mixing_recovered']:.1%} | {long} | {h} |")
    return rows


def plot(runs: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, scores in runs.items():
        for name, entry in scores.items():
            if name in ("protocol", "source") or "long" not in entry:
                continue
            by_pos = entry["long"]["loss_by_position"]
            ax.plot([256 * i for i in range(len(by_pos))], by_pos, label=f"{name} ({label})")
    ax.axvline(8192, color="grey", linestyle=":", label="first memory write")
    ax.set_xlabel("position in the 16,384-token window")
    ax.set_ylabel("held-out loss (256-token buckets)")
    ax.set_title("Long-context check: loss by position, fresh state, 8 windows")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(HERE / "long_context.png", dpi=110)

    logs = HERE / "ft_logs"
    if logs.exists():
        fig, ax = plt.subplots(figsize=(7, 4))
        for path in sorted(logs.glob("*.jsonl")):
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            points = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
            ax.plot(*zip(*points), marker="o", label=path.stem)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("held-out loss (mmrec finetune's lanes)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(HERE / "finetune_curves.png", dpi=110)


def main() -> None:
    out = ["# Distillation experiment: summary (written by analyze_distill.py)", ""]
    runs = {}
    for run in (1, 2, 3):
        data = load(f"distill_results_run{run}.json")
        if data:
            runs[f"run {run}"] = data["scores"]
            out += [f"## Step 0, run {run}", "", *table(data["summary"]), ""]
    data = load("finetune_results_run3.json")
    if data:
        out += ["## After 500 fine-tuning steps, run 3", "", *table(data["summary"]), ""]
        out += ["| arm | skipped steps | max abs(h) while training | held-out loss (finetune lanes) by step |",
                "|---|---|---|---|"]
        for name, log in data["logs"].items():
            curve = ", ".join(f"{s}: {l:.2f}" for s, l in log["eval"])
            out.append(f"| {name} | {log['skipped_steps']} | {log['max_abs_h']:.3g} | {curve} |")
    (HERE / "summary.md").write_text("\n".join(out) + "\n")
    plot({k: v for k, v in runs.items() if k != "run 1"})
    print("\n".join(out))


if __name__ == "__main__":
    main()
