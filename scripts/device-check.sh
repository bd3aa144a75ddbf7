#!/usr/bin/env bash
# Runs on a GPU machine that has device-bundle/ (from scripts/device-bundle), the NVIDIA driver
# and Python with PyTorch, but no Rust. Writes every log into the folder given as argument.
#
#   bash scripts/device-check.sh "$OUT"            # from the repository root
#
# Steps: nvidia-smi; every test binary with REQUIRE_GPU=1 (a missing GPU fails them);
# compute-sanitizer memcheck and racecheck on the GPU test binaries; the benchmarks when present.
# Exits non-zero when any test failed.
set -uo pipefail
logs=${1:?usage: device-check.sh LOG_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
bundle="$root/device-bundle"
mkdir -p "$logs"
export REQUIRE_GPU=1 INVASPREAD_EXE="$bundle/bin/invaspread" INVASPREAD_REPO="$root"
cd "$root"
status=0
summary="$logs/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

note "commit: $(cat "$bundle/COMMIT" 2>/dev/null | tr '\n' ' ')"
note "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi > "$logs/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed"
head -n 15 "$logs/nvidia-smi.txt"
"$INVASPREAD_EXE" info --kernels > "$logs/info.txt" 2>&1
head -n 12 "$logs/info.txt"

for t in "$bundle"/bin/test-* "$bundle"/bin/unit-lib-*; do
  [[ -x "$t" ]] || continue
  name=$(basename "$t")
  if "$t" --test-threads=1 > "$logs/$name.log" 2>&1; then
    note "PASS $name: $(grep -E '^test result' "$logs/$name.log" | tail -1)"
  else
    note "FAIL $name (see $name.log)"; status=1
  fi
done

if command -v compute-sanitizer >/dev/null 2>&1; then
  for t in "$bundle"/bin/test-gpu_*; do
    [[ -x "$t" ]] || continue
    name=$(basename "$t")
    for tool in memcheck racecheck; do
      if compute-sanitizer --tool "$tool" --error-exitcode 3 "$t" --test-threads=1 > "$logs/sanitizer-$tool-$name.log" 2>&1; then
        note "PASS compute-sanitizer $tool $name: $(grep -E 'ERROR SUMMARY' "$logs/sanitizer-$tool-$name.log" | tail -1)"
      else
        note "FAIL compute-sanitizer $tool $name"; status=1
      fi
    done
  done
else
  note "compute-sanitizer not found: sanitizer checks not run"; status=1
fi

for b in "$bundle"/bin/bench-*; do
  [[ -x "$b" ]] || continue
  name=$(basename "$b")
  "$b" --bench > "$logs/$name.log" 2>&1 && note "ran $name" || { note "FAIL $name"; status=1; }
done
note "device-check: exit $status"
exit $status
