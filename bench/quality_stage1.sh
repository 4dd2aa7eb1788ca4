#!/usr/bin/env bash
# Quality study stage 1 (issue #24): MeZO-LoRA against backprop-LoRA on SST-2 at 60 minutes, --dtype auto.
# Two lanes of one-thread processes on the 2-core box; budgets are quiet-machine seconds per step (2 threads), so the
# lanes' own wall clock is not the budget. Each phase is one lane; run two phases side by side. A run whose
# logs/NAME.done exists is skipped, so a phase can be started again after an interruption.
#
#   DATA=../shared/data bash bench/quality_stage1.sh measure      # quiet box only: seconds per step, bf16 (auto)
#   DATA=../shared/data bash bench/quality_stage1.sh mezo-1a &    # the dev-split grid at the 60-minute budget,
#   DATA=../shared/data bash bench/quality_stage1.sh mezo-1b &    #   seed 0, two runs side by side (~90 min)
#   DATA=../shared/data bash bench/quality_stage1.sh mezo-2a &    # its second round
#   DATA=../shared/data bash bench/quality_stage1.sh mezo-2b &
#   DATA=../shared/data bash bench/quality_stage1.sh bp-grid      # backprop-LoRA lrs (early stopping on dev)
#   DATA=../shared/data bash bench/quality_stage1.sh seeds-mezo S # seed S at the dev choice
#   DATA=../shared/data bash bench/quality_stage1.sh seeds-bp S
#   .venv/bin/python bench/quality_report.py bench/out/quality/stage1.jsonl
STAGE=stage1
source "$(dirname "$0")/quality_lane.sh"
# bench_quality.py --measure --method mezo-lora bp-lora --dtype auto --measure-steps 10 on the quiet box, 2 threads,
# 2026-12-07 (bf16 chosen by auto): forward 0.3135 s, MeZO-LoRA step 0.6744 s, backprop-LoRA step 1.2379 s
FWD=0.3135 MEZO_LORA=0.6744 BP_LORA=1.2379
chosen() {  # chosen METHOD: "LR [SCHEDULE]", the seed-0 dev choice at the 60-minute budget
  $PY bench/quality_report.py "$RUNS" --choose "$1" --task sst2 --k 16
}
MEZO=(--method mezo-lora --step-seconds $MEZO_LORA --sec-per-fe $FWD --budgets-min 15 30 60)
BP=(--method bp-lora --step-seconds $BP_LORA --sec-per-fe $FWD --budgets-min 15 30 60 --eval-every 45 --patience 300)

case "${1:-}" in
measure) $PY bench/bench_quality.py --measure --method mezo-lora bp-lora --dtype auto --measure-steps 10 \
           --data-dir "$DATA" | tee -a "$OUT/measure-stage1.jsonl" ;;
mezo-1a) q s1-mezo-linear-2e-3 "${MEZO[@]}" --lr 2e-3 --schedule linear ;;
mezo-1b) q s1-mezo-constant-1e-3 "${MEZO[@]}" --lr 1e-3 --schedule constant ;;
mezo-2a) q s1-mezo-linear-1e-3 "${MEZO[@]}" --lr 1e-3 --schedule linear ;;
mezo-2b) q s1-mezo-linear-4e-3 "${MEZO[@]}" --lr 4e-3 --schedule linear ;;
bp-grid) for lr in ${BP_LRS:-1e-4 3e-4 1e-3}; do q s1-bp-$lr "${BP[@]}" --lr $lr; done ;;
seeds-mezo) read -r lr sched <<<"$(chosen mezo-lora)"; sched=${sched:-constant}
            q s1-mezo-$sched-$lr-s$2 "${MEZO[@]}" --seed "$2" --lr "$lr" --schedule "$sched" ;;
seeds-bp)   read -r lr sched <<<"$(chosen bp-lora)"; sched=${sched:-constant}
            q s1-bp-$lr-s$2 "${BP[@]}" --seed "$2" --lr "$lr" --schedule "$sched" ;;
*) echo "usage: $0 measure|mezo-1a|mezo-1b|mezo-2a|mezo-2b|bp-grid|seeds-mezo S|seeds-bp S" >&2; exit 2 ;;
esac
