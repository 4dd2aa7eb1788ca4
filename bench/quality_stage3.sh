#!/usr/bin/env bash
# Quality study stage 3 (issue #24): low-rank directions (r = 1, 4) against Gaussian ones, full-parameter MeZO on
# SST-2, at 5, 10 and 30 minutes and at equal forwards, 3 seeds, beside backprop full-parameter. --dtype auto for
# MeZO (bf16 on an AMX box: virtual perturbation, stochastic rounding); backprop full-parameter runs fp32 (AdamW on
# bf16 weights without masters loses most updates, which is not the baseline a user would run).
# One-thread processes, two phases side by side on the 2-core box; a run whose logs/NAME.done exists is skipped.
#
#   DATA=../shared/data bash bench/quality_stage3.sh grid gaussian   # lrs on seed 0, 30-minute budget (one lane)
#   DATA=../shared/data bash bench/quality_stage3.sh grid r1
#   DATA=../shared/data bash bench/quality_stage3.sh grid r4
#   DATA=../shared/data bash bench/quality_stage3.sh grid bp
#   DATA=../shared/data bash bench/quality_stage3.sh seeds KIND S    # KIND at its dev-chosen lr, seed S
#   .venv/bin/python bench/quality_report.py bench/out/quality/stage3.jsonl
STAGE=stage3
source "$(dirname "$0")/quality_lane.sh"
# bench_quality.py --measure --measure-steps 10 --dtype auto --eps 1e-3 on the quiet box, 2 threads, 2026-12-07
# (bf16): forward 0.3141 s; MeZO full-parameter steps: Gaussian 1.0817 s, low-rank r = 1 0.9194 s, r = 4 0.9389 s.
# Backprop full-parameter fp32: BP_FULL (bench/out/quality/measure-stages.jsonl; 3.51 s on 2026-11-30).
FWD=0.3141 BP_FULL=${BP_FULL:-3.51}
declare -A STEP=([gaussian]=1.0817 [r1]=0.9194 [r4]=0.9389 [bp]=$BP_FULL)
declare -A ARGS=([gaussian]="--method mezo-full --eps 1e-3"
                 [r1]="--method mezo-full --eps 1e-3 --distribution lowrank --lowrank-r 1"
                 [r4]="--method mezo-full --eps 1e-3 --distribution lowrank --lowrank-r 4"
                 [bp]="--method bp-full --dtype float32 --eval-every 45 --patience 300")
declare -A LRS=([gaussian]="3e-5 1e-4 3e-4" [r1]="3e-5 1e-4 3e-4" [r4]="3e-5 1e-4 3e-4" [bp]="1e-5 3e-5 1e-4")
budgets() {  # budgets KIND: 5 10 30 minutes, and for low-rank the minutes that buy Gaussian's step counts
  $PY - "${STEP[$1]}" "${STEP[gaussian]}" "$1" <<'PY'
import math, sys
own, gauss, kind = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
out = [5.0, 10.0, 30.0]
if kind in ("r1", "r4"):        # equal forwards: Gaussian's steps at each budget, minus half a step against rounding
    out += [round((math.ceil(m * 60 / gauss) - 0.5) * own / 60, 4) for m in (5, 10, 30)]
print(" ".join(f"{m:g}" for m in sorted(out)))
PY
}
train() {  # train KIND LR SEED
  # shellcheck disable=SC2086
  q s3-$1-$2-s$3 ${ARGS[$1]} --lr "$2" --seed "$3" --step-seconds "${STEP[$1]}" --sec-per-fe $FWD \
      --budgets-min $(budgets "$1")
}
case "${1:-}" in
grid)  for lr in ${LRS[$2]}; do train "$2" "$lr" 0; done ;;
seeds) declare -A NAME=([gaussian]="mezo-full" [r1]="mezo-full lowrank r=1" [r4]="mezo-full lowrank r=4"
                        [bp]="bp-full")
       lr=$($PY bench/quality_report.py "$RUNS" --choose "${NAME[$2]}" --task sst2 --k 16)
       train "$2" "$lr" "$3" ;;
*) echo "usage: $0 grid gaussian|r1|r4|bp, or seeds KIND SEED" >&2; exit 2 ;;
esac
