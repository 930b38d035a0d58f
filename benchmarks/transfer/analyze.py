"""Read the fine-tuning loss logs of results/run*/ and write results/summary.json, results/summary.md and
the plots (results/loss_curves.png, results/loss_curves_run2.png).

"Steps to reach (b)": the first step at which an arm's held-out loss (evaluated every 20 steps, linearly
interpolated between evaluations) is at or below the final held-out loss of (b), the fresh init trained with
the same seed in the same run; and the same on the training loss (a 25-step moving average against the mean
of (b)'s last 25 step losses).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LABELS = {"a": "(a) converted, default mapping", "b": "(b) fresh init", "c": "(c) converted, extended mapping",
          "emb-only": "fresh + converted embedding/head", "ffn-only": "fresh + converted MLPs/norms",
          "no-att": "converted, memory attention W_q/W_o fresh", "init-only": "converted init of new parts only"}
WINDOW = 25


def read(arm_dir: Path) -> dict:
    records = [json.loads(line) for line in (arm_dir / "loss_log.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    summary = arm_dir / "finetune_summary.json"
    return {"train": train, "eval": evals,
            "summary": json.loads(summary.read_text()) if summary.exists() else None}


def smooth(values: list[float], window: int = WINDOW) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def first_crossing(points: list[tuple[int, float]], target: float) -> float | None:
    """First step (interpolated) at which the curve is at or below target."""
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v0 <= target:
            return float(s0)
        if v1 <= target:
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def analyse_run(run: Path) -> dict:
    arms = {d.name[3:]: read(d) for d in sorted(run.glob("ft-*")) if (d / "loss_log.jsonl").exists()}
    out = {}
    for arm, data in arms.items():
        name, _, seed = arm.partition("-s")
        if name not in LABELS:  # e.g. "emb-only" has a dash itself
            name, seed = arm, ""
        if arm.endswith(("-s1", "-s2", "-s3")):
            name, seed = arm.rsplit("-s", 1)
        seed = int(seed or 0)
        base = arms.get("b" if seed == 0 else f"b-s{seed}")
        target_eval = base["eval"][-1][1]
        base_losses = [v for _, v in base["train"]]
        target_train = sum(base_losses[-WINDOW:]) / len(base_losses[-WINDOW:])
        steps = [s for s, _ in data["train"]]
        smoothed = list(zip(steps, smooth([v for _, v in data["train"]])))
        finished = data["summary"] is not None and data["summary"]["finished"]
        total = base["train"][-1][0]
        to_eval = first_crossing(data["eval"], target_eval)
        to_train = first_crossing(smoothed, target_train)
        out[arm] = {
            "label": LABELS.get(name, name), "seed": seed, "finished": finished, "steps": steps[-1] if steps else 0,
            "initial_eval_loss": data["eval"][0][1], "final_eval_loss": data["eval"][-1][1],
            "final_train_loss": sum(v for _, v in data["train"][-WINDOW:]) / len(data["train"][-WINDOW:]),
            "b_final_eval_loss": target_eval, "b_final_train_loss": target_train,
            "steps_to_b_final_eval": None if to_eval is None else round(to_eval, 1),
            "steps_to_b_final_train": None if to_train is None else round(to_train, 1),
            "fraction_of_b_steps_eval": None if to_eval is None else round(to_eval / total, 3),
            "fraction_of_b_steps_train": None if to_train is None else round(to_train / total, 3),
            "tokens_per_s": data["summary"]["tokens_per_s"] if data["summary"] else None,
        }
    return {"arms": out, "pretrain": json.loads((run / "pretrain_summary.json").read_text()), "curves": arms}


def plot(run_name: str, result: dict, path: Path, arms: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = dict(zip(["a", "b", "c", "emb-only", "ffn-only", "no-att", "init-only"],
                      ["tab:blue", "black", "tab:green", "tab:orange", "tab:purple", "tab:red", "tab:gray"]))
    for arm in arms:
        if arm not in result["curves"]:
            continue
        data, info = result["curves"][arm], result["arms"][arm]
        base = arm.rsplit("-s", 1)[0] if arm.endswith(("-s1", "-s2")) else arm
        style = "--" if info["seed"] else "-"
        label = f"{info['label']}" + (f" (seed {info['seed']})" if info["seed"] else "")
        steps = [s for s, _ in data["train"]]
        left.plot(steps, smooth([v for _, v in data["train"]]), style, color=colors.get(base), label=label,
                  linewidth=1.3)
        right.plot(*zip(*data["eval"]), style, color=colors.get(base), label=label, linewidth=1.3, marker=".",
                   markersize=3)
    held = result["pretrain"]["held_out_loss"]
    right.axhline(held, color="tab:brown", linestyle=":", label=f"source LLaMA held-out ({held:.2f})")
    b = result["arms"]["b"]["b_final_eval_loss"]
    right.axhline(b, color="black", linestyle=":", linewidth=0.8)
    left.set_title(f"{run_name}: training loss ({WINDOW}-step moving average)")
    right.set_title(f"{run_name}: held-out loss (every 20 steps)")
    for ax in (left, right):
        ax.set_xlabel("fine-tuning step (32 x 64 tokens)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_ylim(2.2 if ax is left else 3.3, 7.5)
        ax.grid(alpha=0.3)
    right.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    results = {run.name: analyse_run(run) for run in sorted(RESULTS.glob("run*"))}
    plot("run 1", results["run1"], RESULTS / "loss_curves.png",
         ["b", "a", "c", "emb-only", "ffn-only", "no-att", "init-only"])
    plot("run 2", results["run2"], RESULTS / "loss_curves_run2.png",
         ["b", "a", "no-att", "b-s1", "a-s1", "c-s1", "emb-only-s1"])
    summary = {run: {"pretrain": {k: v for k, v in r["pretrain"].items() if k != "log"}, "arms": r["arms"]}
               for run, r in results.items()}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = []
    for run, r in summary.items():
        p = r["pretrain"]
        lines.append(f"### {run} (source LLaMA: {p['parameters']:,} parameters, held-out loss "
                     f"{p['held_out_loss']:.3f})\n")
        lines.append("| arm | seed | held-out loss: start → end | train loss (last 25) | steps to (b)'s final "
                     "held-out loss | same, on train loss |")
        lines.append("|---|---|---|---|---|---|")
        for arm, a in r["arms"].items():
            def cell(steps, frac):
                return "not reached" if steps is None else f"{steps:.0f} ({frac:.0%})"
            status = "" if a["finished"] else f" (stopped at step {a['steps']})"
            lines.append(f"| {a['label']}{status} | {a['seed']} | {a['initial_eval_loss']:.3f} → "
                         f"{a['final_eval_loss']:.3f} | {a['final_train_loss']:.3f} | "
                         f"{cell(a['steps_to_b_final_eval'], a['fraction_of_b_steps_eval'] or 0)} | "
                         f"{cell(a['steps_to_b_final_train'], a['fraction_of_b_steps_train'] or 0)} |")
        lines.append("")
    (RESULTS / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
