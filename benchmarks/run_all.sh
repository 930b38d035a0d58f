#!/usr/bin/env bash
# Conversion benchmarks: run as root (drop_caches, cgroup v1 caps) from the repo root.
#   benchmarks/run_all.sh [WORK_DIR] [BEFORE_CHECKOUT]
# BEFORE_CHECKOUT: another engine's checkout with its own .venv (e.g. `git worktree add /tmp/mmrec-before
# cd84bed` + its venv) measured in the same passes as the 'before' case; left out without it.
# Needs ~80 GB free under WORK_DIR at the 13b step (26 GB source + 39 GB output + 10 GB reserve);
# each case deletes its output right after it is measured, each preset its source at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/mmrec-bench-convert}
BEFORE=()
[ -n "${2:-}" ] && BEFORE=(before --before-engine "$2")
PY=.venv/bin/python
B=benchmarks/bench_convert.py
# 1b: two back-to-back passes of the baselines and ours (the machine is shared: ratios within one pass),
# then dask worker processes, the 2 GiB cap and the Meta layout
$PY $B --work "$WORK" --presets 1b --cases cp load_all ours ours_guide first_byte "${BEFORE[@]}" --repeat 2 --keep-source
$PY $B --work "$WORK" --presets 1b --cases workers2 ours_cap meta
# 7b: baselines (an OOM kill under the 20 GiB safety cap is recorded, not skipped)
$PY $B --work "$WORK" --presets 7b --cases cp ours ours_guide load_all "${BEFORE[@]}"
# 13b: cp first (its copy is deleted before converting), then ours, --init guide, ours under a 2 GiB cap
$PY $B --work "$WORK" --presets 13b --cases cp ours ours_guide ours_cap
# where the time goes, and the generation rate per core
$PY benchmarks/bench_init.py
# tables into benchmarks/RESULTS.md (between the markers) and plots into benchmarks/results/
$PY $B --report
