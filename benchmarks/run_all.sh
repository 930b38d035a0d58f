#!/usr/bin/env bash
# Conversion benchmarks (issues 5 and 6): run as root (drop_caches, cgroup v1 caps) from the repo root.
#   benchmarks/run_all.sh [WORK_DIR]
# Needs ~80 GB free under WORK_DIR at the 13b step (26 GB source + 39 GB output + 10 GB reserve);
# each case deletes its output right after it is measured, each preset its source at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/mmrec-bench-convert}
PY=.venv/bin/python
B=benchmarks/bench_convert.py
# 1b: dask worker processes, the 2 GiB cap and the Meta layout; then 3 back-to-back passes of the
# baselines and ours (the machine is shared: ratios within one pass)
$PY $B --work "$WORK" --presets 1b --cases workers2 ours_cap meta --keep-source
$PY $B --work "$WORK" --presets 1b --cases cp load_all per_shard ours --repeat 3
# 7b: every baseline (an OOM kill under the 20 GiB safety cap is recorded, not skipped), --workers 2, Meta
$PY $B --work "$WORK" --presets 7b --cases cp ours load_all per_shard workers2 meta
# 13b: cp first (its copy is deleted before converting), then ours, then ours under a 2 GiB cap
$PY $B --work "$WORK" --presets 13b --cases cp ours ours_cap
# tables into benchmarks/RESULTS.md (between the markers) and plots into benchmarks/results/
$PY $B --report
