#!/usr/bin/env bash
# The GPU check of a build, on a machine with the NVIDIA driver and Python with PyTorch but no
# Rust: it runs the executables of device-bundle/ (made here by scripts/device-bundle) from the
# repository root. Fits a short GPU lease: two calls of under 10 minutes each cover everything.
#
#   PHASES=check bash scripts/device-check.sh "$OUT"   # GPU tests (REQUIRE_GPU=1), then
#                                                      # compute-sanitizer memcheck + racecheck
#   PHASES=bench bash scripts/device-check.sh "$OUT"   # bench-loss and bench-train beside
#                                                      # PyTorch, resnet18 2 epochs on CIFAR-10
#
# OUT gets two files, written even when a step times out or the script is stopped by a signal
# (an EXIT trap): summary.txt (a PASS / FAIL / TIMEOUT / SKIP line per step, the measured
# tables) and device-check-<phases>.tar.gz (every log). The exit status is 0 only when every
# step passed.
#
# Settings (environment):
#   PHASES          check | bench | all (default), or steps: tests sanitizer bench-loss bench-train cifar
#   ONLY_GPU_TESTS  1 (default): the GPU tests (test-gpu); 0: every test executable
#                   in the bundle (scripts/device-bundle packs the others only with ALL_TESTS=1)
#   SMOKE=1         every step at tiny sizes, to test this script itself: CI runs it on the
#                   virtual GPU (INVASPREAD_GPU=virtual), where it takes a few minutes
#   DEADLINE_S      seconds the whole run may take (default 540, under the device tool's 600):
#                   each step's own timeout is cut to what is left, later steps are NOT RUN
#   BUNDLE          the bundle (default: device-bundle/ in the repository root)
#   NCU=1           also an Nsight Compute profile of the fused loss kernels (bench phase)
# A missing or damaged bundle (its MANIFEST's checksums) is a failure, never a silent skip.
set -uo pipefail

out=${1:?usage: [PHASES=check|bench|all] [SMOKE=1] bash scripts/device-check.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
bundle=${BUNDLE:-$root/device-bundle}
smoke=${SMOKE:-0}
[[ "$smoke" == 1 ]] || smoke=0
only_gpu_tests=${ONLY_GPU_TESTS:-1}
deadline=$(( $(date +%s) + ${DEADLINE_S:-540} ))
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d)
logs="$work/logs"
mkdir -p "$logs"
summary="$out/summary.txt"
: > "$summary"
status=0

phases=""
for p in ${PHASES:-all}; do
  case "$p" in
    all) phases+=" tests sanitizer bench-loss bench-train cifar" ;;
    check) phases+=" tests sanitizer" ;;
    bench) phases+=" bench-loss bench-train cifar" ;;
    tests | sanitizer | bench-loss | bench-train | cifar) phases+=" $p" ;;
    *) echo "device-check: unknown phase '$p' in PHASES (check, bench, all, tests, sanitizer, bench-loss, bench-train, cifar)" >&2
       exit 2 ;;
  esac
done
phases+=" "
tag=$(echo ${PHASES:-all} | tr ' ' '-')
want() { [[ "$phases" == *" $1 "* ]]; }
note() { echo "$*" | tee -a "$summary"; }
fail() { note "FAIL $*"; status=1; }

finish() {
  note "device-check: $( ((status == 0)) && echo passed || echo FAILED ) (exit $status) at $(date -u +%H:%M:%SZ)"
  cp "$summary" "$logs/summary.txt"
  tar -C "$work" -czf "$out/device-check-$tag.tar.gz" logs 2>/dev/null || echo "device-check: could not pack the logs" >&2
  rm -rf "$work"
  exit "$status"
}
trap finish EXIT
step_pid="" step_name=""
on_signal() {
  [[ -n "$step_pid" ]] && kill -TERM "$step_pid" 2> /dev/null && wait "$step_pid" 2> /dev/null
  note "device-check: stopped by a signal${step_name:+ during $step_name}"
  status=1
  exit
}
trap on_signal INT TERM HUP

# Runs "$@" as step NAME with at most LIMIT seconds (cut to what the deadline leaves), its output
# in logs/LOG. Says TIMEOUT or FAIL (with the log's tail) in the summary; the caller says PASS.
# STEP_SECONDS holds the time it took.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$(( deadline - $(date +%s) - 15 ))
  if (( left < 10 )); then
    note "NOT RUN $name: the deadline (DEADLINE_S) has passed"
    status=1
    return 1
  fi
  (( limit > left )) && limit=$left
  local start=$(date +%s)
  # In the background with `wait`, so that a signal reaches the trap at once (bash runs a trap
  # only after a foreground command ends); the trap passes it on to the step.
  step_name=$name
  timeout --kill-after=10 "$limit" "$@" > "$logs/$log" 2>&1 &
  step_pid=$!
  wait "$step_pid"
  local rc=$?
  step_pid=""
  STEP_SECONDS=$(( $(date +%s) - start ))
  if (( rc == 124 || rc == 137 )); then
    note "TIMEOUT $name after ${STEP_SECONDS} s (limit $limit s; logs/$log)"
    tail -n 3 "$logs/$log" | sed 's/^/    /' | tee -a "$summary"
    status=1
    return 1
  elif (( rc != 0 )); then
    fail "$name: exit $rc after ${STEP_SECONDS} s (logs/$log)"
    tail -n 8 "$logs/$log" | sed 's/^/    /' | tee -a "$summary"
    return 1
  fi
  return 0
}

# ---- the bundle ------------------------------------------------------------------------------
note "device-check: phases:$phases; SMOKE=$smoke; ONLY_GPU_TESTS=$only_gpu_tests; INVASPREAD_GPU=${INVASPREAD_GPU:-auto}"
note "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [[ ! -f "$bundle/MANIFEST" ]]; then
  fail "bundle: $bundle/MANIFEST is missing: run scripts/device-bundle here, then carry device-bundle"
  exit
fi
if ! (cd "$bundle" && sha256sum --quiet -c MANIFEST) > "$logs/bundle-check.txt" 2>&1; then
  fail "bundle: checksums of $bundle do not match its MANIFEST (logs/bundle-check.txt)"
  exit
fi
note "commit: $(tr '\n' ' ' < "$bundle/COMMIT")"
if ! tar -C "$work" -xzf "$bundle/bin.tar.gz" || [[ ! -x "$work/bin/invaspread" ]]; then
  fail "bundle: $bundle/bin.tar.gz does not unpack to bin/invaspread"
  exit
fi
bin="$work/bin"
export REQUIRE_GPU=1 INVASPREAD_EXE="$bin/invaspread" INVASPREAD_REPO="$root"
# The bundle's own copy of the virtual GPU (the build folder of the binaries may not exist).
[[ "${INVASPREAD_GPU:-}" == virtual && -f "$bundle/vgpu/libcuda.so" ]] && export INVASPREAD_VGPU_DIR="$bundle/vgpu"
cd "$root"

# cuBLAS and NVTX come with PyTorch's wheels there; cudarc opens them by name (libcublas.so.13,
# libnvToolsExt.so.1), so their folders go on LD_LIBRARY_PATH.
py_libs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for base in site.getsitepackages():
    for lib in glob.glob(os.path.join(base, "nvidia", "*", "lib")) + glob.glob(os.path.join(base, "nvidia", "cu*", "lib")):
        dirs.add(lib)
print(":".join(sorted(dirs)))
PY
)
[[ -n "$py_libs" ]] && export LD_LIBRARY_PATH="$py_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NCCL's wheel ships libnccl.so.2 only, and cudarc asks for libnccl.so: a link to it, first on the
# path (the data-parallel tests need it; the virtual GPU brings its own).
if [[ "${INVASPREAD_GPU:-}" != virtual ]]; then
  for dir in ${py_libs//:/ }; do
    if [[ -f "$dir/libnccl.so.2" ]]; then
      mkdir -p "$work/nccl" && ln -sf "$dir/libnccl.so.2" "$work/nccl/libnccl.so"
      export LD_LIBRARY_PATH="$work/nccl:$LD_LIBRARY_PATH"
      break
    fi
  done
fi

if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$logs/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed (logs/nvidia-smi.txt)"
  note "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
fi
"$bin/invaspread" info --kernels > "$logs/info.txt" 2>&1
if ! grep -q "^cuda device 0:" "$logs/info.txt"; then
  fail "no GPU: invaspread info finds no CUDA device (logs/info.txt)"
  grep -E "^cuda|^cublas|^virtual" "$logs/info.txt" | sed 's/^/    /' | tee -a "$summary"
  exit
fi
note "$(grep -m1 '^cuda device 0:' "$logs/info.txt")"
virtual=0
grep -q "^virtual GPU:   in use" "$logs/info.txt" && virtual=1
# PyTorch with a CUDA device is needed for the comparisons on a GPU machine; a smoke run on the
# virtual GPU has none (PyTorch cannot use it).
have_torch=0
python3 -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1 && have_torch=1
torch_missing() {
  if ((smoke)); then note "SKIP $1: no PyTorch with a CUDA device (SMOKE=1)"; else fail "$1: no PyTorch with a CUDA device"; fi
}

# ---- tests -----------------------------------------------------------------------------------
# The GPU tests (one executable, test-gpu, a module per part: one step each); at smoke size,
# each module's smallest case only.
gpu_modules="normalize loss nn cli dist train_ranks"
smoke_filter() {
  case "$1" in
    loss) echo loss::sanitizer_sized_cases ;;
    nn) echo nn::sanitizer_sized_ops ;;
    cli) echo cli::bench_loss_over_two_ranks_checks_every_version ;;
    dist) echo dist::collectives_across_2_processes ;;
    train_ranks) echo train_ranks::a_killed_rank_stops_the_other_with_its_name ;;
    *) echo "$1::" ;;
  esac
}
# Runs test executable $1 as step $2 with test filter $3.
run_tests() {
  local t=$1 name=$2 filter=$3
  ran=$((ran + 1))
  if run_step "$name" "$( ((smoke)) && echo 120 || echo 300)" "$name.log" "$t" --test-threads=1 $filter; then
    note "PASS $name${filter:+ ($filter)}: $(grep -E '^test result' "$logs/$name.log" | tail -1) [${STEP_SECONDS} s]"
    skipped=$(grep -c "SKIPPED (no GPU)" "$logs/$name.log")
    ((skipped > 0)) && fail "$name: $skipped test(s) SKIPPED although REQUIRE_GPU=1"
    # Tests of several ranks need as many GPUs; on fewer they say so (not a failure).
    fewer=$(grep -c "SKIPPED (fewer than" "$logs/$name.log")
    ((fewer > 0)) && note "  $name: $fewer test(s) need more GPUs than this machine has"
  fi
}
if want tests; then
  ran=0
  if [[ -x "$bin/test-gpu" ]]; then
    for m in $gpu_modules; do
      if ((smoke)); then filter=$(smoke_filter "$m"); else filter="$m::"; fi
      run_tests "$bin/test-gpu" "test-gpu $m" "$filter"
    done
  fi
  if [[ "$only_gpu_tests" != 1 ]]; then
    for t in "$bin"/test-* "$bin"/unit-lib-*; do
      [[ -x "$t" ]] || continue
      name=$(basename "$t")
      # test-emulated tests the emulator itself (CI runs it); it has no meaning on a real GPU.
      [[ "$name" == test-gpu || "$name" == test-emulated ]] && continue
      run_tests "$t" "$name" ""
    done
  fi
  ((ran > 0)) || fail "tests: no test binary in the bundle"
  # The criterion benches once per case (--test): each checks its output before it would time.
  for b in bench-instance_loss bench-train_step; do
    if ((smoke)); then
      note "SKIP $b --test: CI runs it on the virtual GPU through cargo test (SMOKE=1)"
    elif [[ ! -x "$bin/$b" ]]; then
      fail "$b is not in the bundle"
    elif run_step "$b --test" 300 "$b.log" "$bin/$b" --test; then
      note "PASS $b --test: $(grep -c '^Success' "$logs/$b.log") cases checked [${STEP_SECONDS} s]"
    fi
  done
fi

# ---- compute-sanitizer -----------------------------------------------------------------------
if want sanitizer; then
  if ((virtual)); then
    note "SKIP sanitizer: the virtual GPU's own memcheck and racecheck ran inside every step above (compute-sanitizer needs a real GPU)"
  elif ! command -v compute-sanitizer > /dev/null; then
    fail "sanitizer: compute-sanitizer not found"
  else
    # Only this crate's kernels (not cuBLAS's): one --kernel-name filter per kernel name. Whether
    # this compute-sanitizer takes several is probed first on `true` (not yet tried on a GPU
    # here); if not, every kernel is checked, cuBLAS's too, rather than none.
    filters=()
    while read -r k; do [[ -n "$k" ]] && filters+=(--kernel-name "kne=$k"); done < "$bundle/kernels.txt"
    if compute-sanitizer --tool memcheck "${filters[@]}" true > "$logs/sanitizer-filter-probe.log" 2>&1 \
        && grep -q "ERROR SUMMARY" "$logs/sanitizer-filter-probe.log"; then
      note "compute-sanitizer: checking this crate's $(( ${#filters[@]} / 2 )) kernels only"
    else
      note "compute-sanitizer: --kernel-name filters refused (logs/sanitizer-filter-probe.log); checking every kernel"
      filters=()
    fi
    for spec in "test-gpu:normalize::" "test-gpu:loss::sanitizer_sized_cases" "test-gpu:nn::sanitizer_sized_ops"; do
      exe=${spec%%:*}; filter=${spec#*:}
      [[ -x "$bin/$exe" ]] || { fail "sanitizer: $exe is not in the bundle"; continue; }
      for tool in memcheck racecheck; do
        log="sanitizer-$tool-$exe-${filter//:/}.log"
        if run_step "compute-sanitizer $tool $exe" 240 "$log" \
            compute-sanitizer --tool "$tool" --error-exitcode 3 "${filters[@]}" "$bin/$exe" --test-threads=1 $filter; then
          note "PASS compute-sanitizer $tool $exe $filter: $(grep -E 'ERROR SUMMARY' "$logs/$log" | tail -1) [${STEP_SECONDS} s]"
        fi
      done
    done
  fi
fi

# ---- benchmarks ------------------------------------------------------------------------------
if want bench-loss; then
  if ((smoke)); then args=(--n 64 100 --d 16 --min-seconds 0); targs=(--n 64 100 --d 16 --min-seconds 0 --modes eager)
  else args=(--min-seconds 0.2); targs=(--min-seconds 0.2); fi
  if run_step "bench-loss --device cuda" 240 bench-loss-cuda.log "$bin/invaspread" bench-loss --device cuda "${args[@]}"; then
    note "PASS bench-loss --device cuda (every version checked against float64 first) [${STEP_SECONDS} s]"
    grep -E '^\||^error vs' "$logs/bench-loss-cuda.log" | tee -a "$summary"
  fi
  if ((have_torch)); then
    if run_step "benches/torch_reference.py" 200 torch-reference-cuda.log \
        env PYTHONUNBUFFERED=1 python3 benches/torch_reference.py --device cuda "${targs[@]}"; then
      note "PASS benches/torch_reference.py --device cuda [${STEP_SECONDS} s]"
      grep -E '^\||^torch ' "$logs/torch-reference-cuda.log" | tee -a "$summary"
    fi
  else
    torch_missing benches/torch_reference.py
  fi
fi

if want bench-train; then
  if ((smoke)); then args=(--models convnet-small --batch 2 --steps 1 --precision f32); targs=(--models convnet-small --steps 1)
  else args=(--steps 10); targs=(--steps 10); fi
  if run_step "bench-train --device cuda" 240 bench-train-cuda.log "$bin/invaspread" bench-train --device cuda "${args[@]}"; then
    note "PASS bench-train --device cuda [${STEP_SECONDS} s]"
    grep -E '^\||^checked' "$logs/bench-train-cuda.log" | tee -a "$summary"
  fi
  if ((have_torch)); then
    for amp in none bf16; do
      if run_step "torch_train_reference.py --amp $amp" 150 "torch-train-cuda-$amp.log" \
          env PYTHONUNBUFFERED=1 python3 benches/torch_train_reference.py --device cuda --amp $amp "${targs[@]}"; then
        note "PASS benches/torch_train_reference.py --device cuda --amp $amp [${STEP_SECONDS} s]"
        grep '^|' "$logs/torch-train-cuda-$amp.log" | tee -a "$summary"
      fi
    done
  else
    torch_missing benches/torch_train_reference.py
  fi
fi

if want cifar; then
  if ((smoke)); then
    data="$bundle/data/cifar10-smoke.tar.gz"
    args=(--model convnet-small --steps 4 --batch 16 --k 10 --image-size 16 --no-pixel-baseline)
  else
    data="$bundle/data/cifar10-jpg.tar.gz"
    args=(--model resnet18-cifar --epochs 2 --batch 128)
  fi
  if [[ ! -f "$data" ]]; then
    fail "cifar: $data is not in the bundle (scripts/device-bundle copies it from ../shared)"
  elif run_step "CIFAR-10 training on CUDA" 300 cifar-gpu.log "$bin/invaspread" train --device cuda \
      --dataset folder --data-dir "$data" "${args[@]}" --seed 0 --out "$logs/cifar-gpu"; then
    note "PASS CIFAR-10 $(basename "$data") ${args[*]} on CUDA: ${STEP_SECONDS} s wall"
    grep -E "initialisation|^epoch" "$logs/cifar-gpu.log" | tee -a "$summary"
  fi
  rm -f "$logs"/cifar-gpu/*.safetensors   # 45 MB each for resnet18; the curve is what matters
fi

if [[ -n "${NCU:-}" ]] && want bench-loss && command -v ncu > /dev/null; then
  "$bin/invaspread" random --n 4096 --d 128 --out "$work/z4096.npy" > /dev/null 2>&1
  for version in fused-v2 fused-v3-tf32; do
    if run_step "ncu $version" 180 "ncu-$version.txt" ncu --clock-control none -k regex:instance_loss_ --set basic \
        "$bin/invaspread" loss --input "$work/z4096.npy" --device cuda --loss "$version" --grad-out "$work/dz4096.npy"; then
      note "PASS ncu profile of $version (logs/ncu-$version.txt)"
    fi
  done
fi
