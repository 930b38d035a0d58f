"""The conversion report (docs/checkpoint-format.md "conversion_report.json") and its terminal summary."""

from __future__ import annotations

from typing import Any

from mmrec.schema import INIT_FORMAT

from .checksums import ALGORITHM as CHECKSUM_ALGORITHM
from .plan.model import SCORES, ConversionPlan
from .terminal import escape


def build_report(plan: ConversionPlan, checksums: dict[str, str] | None = None,
                 timings: dict | None = None) -> dict[str, Any]:
    """The report's fields (docs/checkpoint-format.md): key counts, scores, shares, dropped tensors, layer
    map, per-tensor recipes, checksums, timings and warnings. Works on a plan alone (checksums/timings then empty)."""
    checksums = checksums or {}
    summary = plan.summary()
    specs = plan.target_specs()
    planned = {tp.name: tp for tp in plan.tensors}
    converted = [tp.name for tp in plan.tensors if tp.kind != "init"]
    missing = [s.name for s in specs if s.name not in planned or planned[s.name].kind == "init"]
    report = {
        "total_keys": summary["total_keys"],
        "converted_keys": len(converted),
        "missing_keys": missing,  # target keys not taken from the source (initialised, or left out)
        "new_keys": [tp.name for tp in plan.tensors if tp.kind == "init"],  # written with a fresh init
        "shape_mismatches": list(plan.shape_mismatches),
        "source_analysis": plan.source_analysis,
        "compatibility_scores": {s.name: planned[s.name].score if s.name in planned else 0.0 for s in specs},
        "total_parameters": summary["total_parameters"],
        "transferred_parameters": summary["transferred_parameters"],
        "transferred_parameter_share": summary["transferred_parameter_share"],
        "score_weighted_share": summary["score_weighted_share"],
        "score_counts": {str(s): sum(1 for tp in plan.tensors if tp.score == s) for s in SCORES},
        "dropped": list(plan.dropped),
        "layer_map": list(plan.layer_map),
        "target_config": plan.target_config,
        "options": plan.options,
        "seed": plan.seed,
        "tensors": {tp.name: {"kind": tp.kind, "dtype": tp.dtype, "shape": list(tp.shape),
                              "sources": list(tp.sources), "transforms": list(tp.transforms),
                              "init": tp.init, "score": tp.score, "checksum": checksums.get(tp.name)}
                    for tp in plan.tensors},
        "checksum_algorithm": CHECKSUM_ALGORITHM,  # of each tensor's bytes as stored (streaming/checksums.py)
        "init_format": INIT_FORMAT,  # which definition of converter-made values (mmrec/init.py)
        "timings": dict(timings or {}),
        "warnings": list(plan.warnings),
    }
    return report


def summary_text(report: dict) -> str:
    """A few readable lines for the terminal."""
    sa = report.get("source_analysis") or {}
    cfg = report.get("target_config") or {}
    counts = report.get("score_counts", {})
    lines = [
        f"source: {sa.get('model_type')} ({sa.get('layout')}), {sa.get('num_layers')} layers, "
        f"dim {sa.get('model_dim')}, vocab {sa.get('vocab_size')}, {sa.get('num_parameters') or 0:,} parameters",
        f"target: MM-Rec {cfg.get('num_layers')} layers, dim {cfg.get('model_dim')}, heads {cfg.get('num_heads')}, "
        f"ffn {cfg.get('ffn_dim')} ({cfg.get('ffn_act')}{', gated' if cfg.get('ffn_gated') else ''}), "
        f"vocab {cfg.get('vocab_size')}, {cfg.get('torch_dtype')}, "
        f"{'tied' if cfg.get('tie_word_embeddings') else 'untied'} head",
        f"keys: {report['converted_keys']} of {report['total_keys']} converted, "
        f"{len(report['new_keys'])} new, {len(report['missing_keys']) - len(report['new_keys'])} left out; "
        f"scores 1.0: {counts.get('1.0', 0)}, 0.8: {counts.get('0.8', 0)}, 0.5: {counts.get('0.5', 0)}, "
        f"0.0: {counts.get('0.0', 0)}",
        f"parameters transferred: {report['transferred_parameters']:,} of {report['total_parameters']:,} "
        f"({report['transferred_parameter_share']:.1%})",
        f"layer map: {_layer_map_text(report['layer_map'])}",
        f"dropped source tensors: {len(report['dropped'])}"
        + (f" ({', '.join(report['dropped'][:4])}{', ...' if len(report['dropped']) > 4 else ''})"
           if report['dropped'] else ""),
    ]
    if report["shape_mismatches"]:
        lines.append(f"shape mismatches: {len(report['shape_mismatches'])}")
    timings = report.get("timings") or {}
    if timings.get("total_seconds") is not None:
        # throughput_bytes_per_second = (read + written) / the whole run, planning included; the progress
        # line's rate counts written bytes only, while writing
        lines.append(f"time: {timings['total_seconds']:.1f} s, read {_mb(timings['bytes_read'])} + wrote "
                     f"{_mb(timings['bytes_written'])}: {_mb(timings['throughput_bytes_per_second'])}/s "
                     f"read+written over the whole run ({timings['scheduler']}, {timings['concurrency']} at once"
                     + (f", {timings['resumed_shards']} shards kept from the interrupted run" if
                        timings.get("resumed_shards") else "") + ")")
    lines += [f"warning: {w}" for w in report["warnings"]]
    # names and strings from the source (tensor names, model_type) may hold control characters
    return "\n".join(escape(line) for line in lines)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _layer_map_text(layer_map: list) -> str:
    if all(s == i for i, s in enumerate(layer_map)):
        return f"0-{len(layer_map) - 1} <- same source layers" if layer_map else "(none)"
    return ", ".join(f"{i}<-{'new' if s is None else s}" for i, s in enumerate(layer_map))
