#!/usr/bin/env bash
# Quality study stage 2 (issue #24): RTE with every baseline. Max length 128 for the trained methods, a 10-minute
# budget per run, 3 seeds, --dtype auto; lrs chosen on seed 0's k-shot dev split (quality_report.py --choose).
# One-thread processes, two phases side by side on the 2-core box; a run whose logs/NAME.done exists is skipped.
#
#   DATA=../shared/data bash bench/quality_stage2.sh untrained   # zero-shot, ICL K = 4 and 16 (3 seeds each)
#   DATA=../shared/data bash bench/quality_stage2.sh grid-mezo   # MeZO-LoRA and MeZO-prefix lrs, seed 0
#   DATA=../shared/data bash bench/quality_stage2.sh grid-bp     # backprop-LoRA lrs, seed 0
#   DATA=../shared/data bash bench/quality_stage2.sh seeds METHOD S   # METHOD at its dev-chosen lr, seed S
#   .venv/bin/python bench/quality_report.py bench/out/quality/stage2.jsonl
STAGE=stage2
source "$(dirname "$0")/quality_lane.sh"
# bench_quality.py --measure --task rte --max-length 128 --method mezo-lora mezo-prefix bp-lora --dtype auto
# --measure-steps 10, quiet box (the stage-1 runs paused), 2 threads, 2026-12-07, bf16 chosen by auto:
# forward 0.8533 s; steps: MeZO-LoRA 1.7396 s, MeZO-prefix 1.8453 s, backprop-LoRA 3.6907 s
FWD=0.8533
declare -A STEP=([mezo-lora]=1.7396 [mezo-prefix]=1.8453 [bp-lora]=3.6907)
declare -A LRS=([mezo-lora]="1e-3 2e-3 4e-3" [mezo-prefix]="1e-3 3e-3 1e-2" [bp-lora]="1e-4 3e-4 1e-3")
train() {  # train METHOD LR SEED
  local extra=()
  if [ "$1" = bp-lora ]; then extra=(--eval-every 45 --patience 300); fi
  q s2-$1-$2-s$3 --task rte --method "$1" --lr "$2" --seed "$3" --max-length 128 --step-seconds "${STEP[$1]}" \
      --sec-per-fe $FWD --budgets-min 5 10 "${extra[@]}"
}

case "${1:-}" in
untrained)
  q s2-zeroshot --task rte --method zeroshot --max-length 128
  # ICL rows run at the model's own context (--icl-max-length unset); --max-length 128 only files them in the
  # table beside the trained rows (the row's icl.max_length records the bound that applied)
  for s in 0 1 2; do for k in 4 16; do q s2-icl-$k-s$s --task rte --method icl --icl-k $k --seed $s --max-length 128; done; done ;;
grid-mezo) for m in mezo-lora mezo-prefix; do for lr in ${LRS[$m]}; do train $m $lr 0; done; done ;;
grid-bp)   for lr in ${LRS[bp-lora]}; do train bp-lora $lr 0; done ;;
seeds)     lr=$($PY bench/quality_report.py "$RUNS" --choose "$2" --task "rte (len 128)" --k 16)
           train "$2" "$lr" "$3" ;;
*) echo "usage: $0 untrained|grid-mezo|grid-bp|seeds METHOD SEED" >&2; exit 2 ;;
esac
