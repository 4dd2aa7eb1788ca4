# Sourced by bench/quality_stage{1,2,3}.sh (not run): the shared setup of a study lane and its run helper.
# The caller sets STAGE (the runs file is $OUT/$STAGE.jsonl) before sourcing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
DATA=${DATA:-../shared/data}
OUT=${OUT:-bench/out/quality}
RUNS=$OUT/$STAGE.jsonl
mkdir -p "$OUT/logs"

q() {  # q NAME ARGS...: one run, one thread, --dtype auto unless ARGS say otherwise; its stderr in logs/NAME.log;
       # skipped once logs/NAME.done exists
  local name=$1; shift
  if [ -f "$OUT/logs/$name.done" ]; then return 0; fi
  $PY bench/bench_quality.py --threads 1 --data-dir "$DATA" --out "$RUNS" --dtype auto "$@" \
      >"$OUT/logs/$name.out" 2>"$OUT/logs/$name.log" && touch "$OUT/logs/$name.done"
}
