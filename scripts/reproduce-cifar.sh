#!/usr/bin/env bash
# The paper's CIFAR-10 comparisons at CPU scale (benches/RESULTS.md, "Reproduction"):
# convnet-small on the CIFAR-10 JPEG copy, the same seed, batch and epochs for every row, kNN
# top-1 (and top-5) after every epoch.
#
#   scripts/reproduce-cifar.sh OUT [ROW...]
#
# Rows: ours npid nce exemplar hard easy no-crop no-jitter no-augment unseen (default: all). Each run goes to
# OUT/<row>; a row whose run has finished is not run again (delete its folder to rerun it);
# an interrupted one resumes. At the end the table of every finished row is printed, with the
# linear probe of `ours` and the unseen-class evaluation, and OUT/curves.png draws the RQ3
# comparison (ours against the baselines). EPOCHS (default 2), SEED (0) and
# BIN (target/release/invaspread) can be set in the environment.
set -euo pipefail
OUT=${1:?usage: scripts/reproduce-cifar.sh OUT [ROW...]}
shift
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(ours npid nce exemplar hard easy no-crop no-jitter no-augment unseen)
EPOCHS=${EPOCHS:-2}
SEED=${SEED:-0}
BIN=${BIN:-target/release/invaspread}
DATA=${DATA:-$(dirname "$0")/../../shared/data/cifar10-jpg/cifar10-jpg.tar.gz}
COMMON=(--dataset folder --data-dir "$DATA" --model convnet-small --epochs "$EPOCHS"
        --seed "$SEED" --no-pixel-baseline)
mkdir -p "$OUT"

flags_of() {
  case "$1" in
    ours) ;;
    npid|nce|exemplar) echo --method "$1" ;;
    hard) echo --negatives hard --negative-fraction 0.5 ;;
    easy) echo --negatives easy --negative-fraction 0.5 ;;
    no-crop) echo --augment jitter,grey,flip ;;
    no-jitter) echo --augment crop,grey,flip ;;
    no-augment) echo --augment none ;;
    unseen) echo --classes 0-4 --eval-classes 5-9 ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

for row in "${ROWS[@]}"; do
  dir=$OUT/$row
  # shellcheck disable=SC2046
  if [ -f "$dir/metrics.csv" ] && [ "$(tail -1 "$dir/metrics.csv" | cut -d, -f1)" = "$EPOCHS" ]; then
    echo "== $row: done already" >&2
    continue
  fi
  resume=()
  [ -f "$dir/state.safetensors" ] && resume=(--resume)
  echo "== $row" >&2
  # shellcheck disable=SC2046
  "$BIN" train "${COMMON[@]}" $(flags_of "$row") --out "$dir" "${resume[@]}"
done

echo
echo "| row | flags | kNN top-1 per epoch (0 = initialised) | last top-5 |"
echo "|---|---|---|---|"
for row in "${ROWS[@]}"; do
  csv=$OUT/$row/metrics.csv
  [ -f "$csv" ] || continue
  per_epoch=$(awk -F, 'NR > 1 { v = ($4 != "" ? $4 : $6); if (v != "") printf "%s%.2f", (n++ ? " / " : ""), 100 * v }' "$csv")
  top5=$(awk -F, 'NR > 1 && $5 != "" { t = $5 } END { if (t != "") printf "%.2f", 100 * t; else printf "-" }' "$csv")
  echo "| $row | $(flags_of "$row") | $per_epoch | $top5 |"
done
runs=()
for row in ours npid nce exemplar; do [ -f "$OUT/$row/metrics.csv" ] && runs+=("$OUT/$row"); done
if [ ${#runs[@]} -gt 1 ]; then
  "$BIN" plot "${runs[@]}" --out "$OUT/curves.png"
fi
if [ -f "$OUT/ours/best.safetensors" ]; then
  echo
  echo "linear probe of ours (eval --linear):"
  "$BIN" eval --checkpoint "$OUT/ours/last.safetensors" --dataset folder --data-dir "$DATA" --linear --json
fi
if [ -f "$OUT/unseen/last.safetensors" ]; then
  echo
  echo "unseen classes 5-9 (eval --classes 5-9):"
  "$BIN" eval --checkpoint "$OUT/unseen/last.safetensors" --dataset folder --data-dir "$DATA" --classes 5-9 --json
fi
