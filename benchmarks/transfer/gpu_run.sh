#!/usr/bin/env bash
# One GPU-machine run of the distillation experiment (the machine has torch and transformers but not dask:
# carry benchmarks/work/pylib and benchmarks/work/transfer/data, see README.md "Distillation").
#   bash benchmarks/transfer/gpu_run.sh OUT distill [--arms a,b]      # prepare + distillation arms + scores
#   bash benchmarks/transfer/gpu_run.sh OUT finetune                   # prepare + 2 distillations + fine-tunes
set -euo pipefail
out=$1; phase=$2; shift 2
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/benchmarks/work/pylib
mkdir -p /tmp/site/mmrec && cp -r mmrec/* /tmp/site/mmrec/ && cp -r streaming /tmp/site/mmrec/streaming \
  && cp -r cli /tmp/site/mmrec/cli
data=benchmarks/work/transfer/data work=/tmp/xp
xp() { python3 benchmarks/transfer/distill_experiment.py --data "$data" --work "$work" --out "$out" "$@"; }
xp --phase prepare
if [ "$phase" = distill ]; then
  xp --phase distill "$@"
else
  xp --phase distill --arms all-1M --deadline 200
  xp --phase finetune --deadline 230
fi
