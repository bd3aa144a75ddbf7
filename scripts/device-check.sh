#!/usr/bin/env bash
# The GPU check of a build, on a machine with the NVIDIA driver and Python with PyTorch but no
# Rust: it runs the executables of device-bundle/ (made here by scripts/device-bundle) from the
# repository root. One call of at most 9 minutes (the device tool's 10-minute command inside a
# 15-minute lease), its steps in the order of what a lease must tell first:
#
#   step         budget  what
#   mma            15 s  the tensor cores' fragment layouts (test-gpu loss::mma_fragment_layouts)
#   loss-tests     60 s  every loss kernel against the float64 reference (test-gpu loss::)
#   torch-op       40 s  the PyTorch op's CUDA path: the bundle's wheel installed beside the
#                        machine's torch, then python/tests/test_torch_cuda.py (a skip fails)
#                        and benches/torch_op.py --device cuda at N = 4,096 and 16,384
#   loss-table    120 s  bench-loss, every version at N = 4,096 .. 262,144, d = 128, with its
#                        floor and ratio; PyTorch eager beside it, torch.compile where time is left
#   train-step    110 s  bench-train's images/s, both encoders, f32/tf32/bf16, with floors;
#                        PyTorch eager and bf16 autocast
#   cifar          65 s  resnet18-cifar on CIFAR-10, 2 epochs, kNN printed per epoch
#   gpu-tests      80 s  the other GPU tests (normalize, nn, cli, dist, train_ranks)
#   bench-checks   20 s  the criterion benches once per case (--test: their checks)
#   sanitizer      30 s  compute-sanitizer memcheck, racecheck (skipped, with the reason, where
#                        it cannot run); last, with what is left
#                 ----
#                 540 s  (the budgets are estimates from the floors until a lease measures them)
#
#   bash scripts/device-check.sh "$OUT"             # all steps
#   STEPS="loss-table cifar" bash scripts/device-check.sh "$OUT"
#
# Every table row is copied into $OUT/summary.txt the moment its step prints it, and after each
# step summary.txt is rewritten from the step's whole log and $OUT/device-check-<steps>.tar.gz
# (every log) is packed again: a run cut at any point, by a timeout, a signal or even SIGKILL,
# leaves every row measured before the cut. The exit status is 0 only when every step passed.
#
# Settings (environment):
#   STEPS           steps to run, in the order above whatever the order given (default: all;
#                   PHASES is read as before: check = the test steps and sanitizer, bench = the
#                   tables and cifar)
#   ONLY_GPU_TESTS  1 (default): the GPU tests (test-gpu); 0: also every other test executable
#                   in the bundle, in gpu-tests (scripts/device-bundle packs them with ALL_TESTS=1)
#   SMOKE=1         every step at tiny sizes, to test this script itself: CI runs it on the
#                   virtual GPU (INVASPREAD_GPU=virtual); same steps, same order
#   DEADLINE_S      seconds the whole run may take (default 540; 1200 with SMOKE=1, the virtual
#                   GPU being slow): a step's limit is its budget (SMOKE: 150 s), cut to what is
#                   left; steps past it are NOT RUN
#   BUNDLE          the bundle (default: device-bundle/ in the repository root)
#   NCU=1           also an Nsight Compute profile of the fused loss kernels (after loss-table)
# A missing or damaged bundle (its MANIFEST's checksums) is a failure, never a silent skip.
set -uo pipefail

out=${1:?usage: [STEPS=...] [SMOKE=1] bash scripts/device-check.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
bundle=${BUNDLE:-$root/device-bundle}
smoke=${SMOKE:-0}
[[ "$smoke" == 1 ]] || smoke=0
only_gpu_tests=${ONLY_GPU_TESTS:-1}
t0=$(date +%s)
deadline=$(( t0 + ${DEADLINE_S:-$( ((smoke)) && echo 1200 || echo 540)} ))
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d)
logs="$work/logs"
mkdir -p "$logs"
summary="$out/summary.txt"
: > "$summary"
status=0

all_steps="mma loss-tests torch-op loss-table train-step cifar gpu-tests bench-checks sanitizer"
declare -A budget=([mma]=15 [loss-tests]=60 [torch-op]=40 [loss-table]=120 [train-step]=110
                   [cifar]=65 [gpu-tests]=80 [bench-checks]=20 [sanitizer]=30)
asked=${STEPS:-${PHASES:-all}}
wanted=" "
for p in $asked; do
  case "$p" in
    all) wanted+="$all_steps " ;;
    check) wanted+="mma loss-tests torch-op gpu-tests bench-checks sanitizer " ;;
    bench) wanted+="loss-table train-step cifar " ;;
    tests) wanted+="mma loss-tests torch-op gpu-tests bench-checks " ;;
    bench-loss) wanted+="loss-table " ;;
    bench-train) wanted+="train-step " ;;
    *) if [[ -n "${budget[$p]:-}" ]]; then wanted+="$p "; else
         echo "device-check: unknown step '$p' (steps: $all_steps; or all, check, bench)" >&2
         exit 2
       fi ;;
  esac
done
steps=""
for st in $all_steps; do [[ "$wanted" == *" $st "* ]] && steps+="$st "; done
steps=${steps% }
tag=$(echo "$asked" | tr ' ' '-')
note() { echo "$*" | tee -a "$summary"; }
fail() { note "FAIL $*"; status=1; }

# The logs, packed into $OUT (to a temporary name, then renamed: a cut never leaves half a file).
pack() {
  cp "$summary" "$logs/summary.txt"
  tar -C "$work" -czf "$out/.device-check-$tag.tar.gz.part" logs 2>/dev/null \
    && mv -f "$out/.device-check-$tag.tar.gz.part" "$out/device-check-$tag.tar.gz" \
    || echo "device-check: could not pack the logs" >&2
}

# ---- one step's commands --------------------------------------------------------------------
# The running command and the follower that copies its table rows into the summary live.
step_pid="" follow_pid="" step_name="" step_log="" summary_mark=0

# Rows a log contributes to the summary: the tables' lines and a few named results.
row_pattern='^\||^(error vs|checked|torch |kNN|epoch )|initialisation'
rows_of() { grep -E "$row_pattern" "$1" 2>/dev/null | sed 's/^/    /'; }

# Stops following and rewrites the summary's rows of the command from its whole log (the live
# copy may lack a last line).
settle_rows() {
  if [[ -n "$follow_pid" ]]; then
    # Its tail ends, the rest of the pipeline reads to the end and the subshell reaps them all.
    pkill -P "$follow_pid" -x tail 2> /dev/null
    wait "$follow_pid" 2> /dev/null
  fi
  follow_pid=""
  if [[ -n "$step_log" ]]; then
    head -n "$summary_mark" "$summary" > "$summary.new"
    rows_of "$logs/$step_log" >> "$summary.new"
    mv -f "$summary.new" "$summary"
  fi
  step_log=""
}

finish() {
  settle_rows
  note "device-check: $( ((status == 0)) && echo passed || echo FAILED ) (exit $status) after $(( $(date +%s) - t0 )) s, at $(date -u +%H:%M:%SZ)"
  pack
  rm -rf "$work"
  exit "$status"
}
trap finish EXIT
on_signal() {
  if [[ -n "$step_pid" ]]; then
    kill -TERM "$step_pid" 2> /dev/null
    wait "$step_pid" 2> /dev/null
  fi
  settle_rows
  note "device-check: stopped by a signal${step_name:+ during $step_name}"
  status=1
  exit
}
trap on_signal INT TERM HUP

# Runs "$@" as NAME with at most LIMIT seconds (cut to the step's and the run's deadlines), its
# output in logs/LOG and its table rows in the summary as they come. Says TIMEOUT or FAIL (with
# the log's tail) in the summary; the caller says PASS. STEP_SECONDS holds the time it took.
run_cmd() {
  local name=$1 limit=$2 log=$3
  shift 3
  local now left
  now=$(date +%s)
  left=$(( step_deadline - now ))
  (( deadline - now - 10 < left )) && left=$(( deadline - now - 10 ))
  if (( left < 5 )); then
    note "NOT RUN $name: no time left (step $step_name's budget or DEADLINE_S)"
    status=1
    return 1
  fi
  (( limit > left )) && limit=$left
  local start=$now
  : > "$logs/$log"
  summary_mark=$(wc -l < "$summary")
  step_log=$log
  ( tail -n +1 -F "$logs/$log" 2> /dev/null \
      | grep --line-buffered -E "$row_pattern" \
      | sed -u 's/^/    /' >> "$summary" ) &
  follow_pid=$!
  # In the background with `wait`, so that a signal reaches the trap at once (bash runs a trap
  # only after a foreground command ends); the trap passes it on.
  timeout --kill-after=10 "$limit" "$@" > "$logs/$log" 2>&1 &
  step_pid=$!
  wait "$step_pid"
  local rc=$?
  step_pid=""
  sleep 0.2
  settle_rows
  STEP_SECONDS=$(( $(date +%s) - start ))
  if (( rc == 124 || rc == 137 )); then
    note "TIMEOUT $name after ${STEP_SECONDS} s (limit $limit s; logs/$log; the rows above were measured)"
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

# Runs step NAME (the function step_NAME) within its budget; packs the logs after it.
step_deadline=0
run_named_step() {
  local st=$1 limit=${budget[$1]}
  ((smoke)) && limit=150
  step_name=$st
  step_deadline=$(( $(date +%s) + limit ))
  note "== $st (budget ${budget[$st]} s$( ((smoke)) && echo "; SMOKE limit $limit s") at +$(( $(date +%s) - t0 )) s)"
  "step_${st//-/_}"
  step_name=""
  pack
}

# ---- the bundle ------------------------------------------------------------------------------
note "device-check: steps: $steps; SMOKE=$smoke; ONLY_GPU_TESTS=$only_gpu_tests; INVASPREAD_GPU=${INVASPREAD_GPU:-auto}"
plan=0
for st in $steps; do plan=$(( plan + budget[$st] )); done
note "plan: $(for st in $steps; do printf '%s %ss, ' "$st" "${budget[$st]}"; done)total $plan s of DEADLINE_S $(( deadline - t0 )) s"
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

# ---- the steps -----------------------------------------------------------------------------
# A test executable's run as a step's command: PASS with its result line; a skip under
# REQUIRE_GPU=1 is a failure.
run_tests() {
  local name=$1 limit=$2
  shift 2
  if run_cmd "$name" "$limit" "${name// /-}.log" "$@" --test-threads=1; then
    local log="$logs/${name// /-}.log"
    note "PASS $name: $(grep -E '^test result' "$log" | tail -1) [${STEP_SECONDS} s]"
    local skipped fewer
    skipped=$(grep -c "SKIPPED (no GPU)" "$log")
    ((skipped > 0)) && fail "$name: $skipped test(s) SKIPPED although REQUIRE_GPU=1"
    # Tests of several ranks need as many GPUs; on fewer they say so (not a failure).
    fewer=$(grep -c "SKIPPED (fewer than" "$log")
    ((fewer > 0)) && note "  $name: $fewer test(s) need more GPUs than this machine has"
  fi
}
need_exe() { [[ -x "$bin/$1" ]] || { fail "$step_name: $1 is not in the bundle"; return 1; }; }

step_mma() {
  need_exe test-gpu && run_tests "test-gpu mma" 600 "$bin/test-gpu" loss::mma_fragment_layouts --exact
}

step_loss_tests() {
  need_exe test-gpu || return
  if ((smoke)); then
    run_tests "test-gpu loss" 600 "$bin/test-gpu" loss::sanitizer_sized_cases
  else
    run_tests "test-gpu loss" 600 "$bin/test-gpu" loss:: --skip loss::mma_fragment_layouts
  fi
}

step_torch_op() {
  # The wheel goes to a folder of its own on PYTHONPATH, beside the machine's torch (nothing is
  # fetched there; pytest is in its image).
  local wheel
  wheel=$(ls "$bundle"/wheels/invaspread-*.whl 2> /dev/null | head -1)
  if [[ -z "$wheel" ]]; then
    fail "torch-op: no invaspread wheel in $bundle/wheels (scripts/device-bundle builds it)"
    return
  fi
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$wheel" \
      > "$logs/torch-op-install.log" 2>&1; then
    fail "torch-op: pip could not install $(basename "$wheel") (logs/torch-op-install.log)"
    tail -n 5 "$logs/torch-op-install.log" | sed 's/^/    /' | tee -a "$summary"
    return
  fi
  if ! ((have_torch)); then
    torch_missing "torch-op"
    return
  fi
  # From outside the checkout, so that the wheel's package (not python/invaspread) is imported.
  # The CPU files ran in CI; this machine's time goes to the CUDA path.
  if run_cmd "pytest test_torch_cuda.py" 600 torch-op-pytest.log env PYTHONPATH="$work/site" REQUIRE_GPU=1 \
      python3 -m pytest -q -rs -p no:cacheprovider --rootdir "$work" "$root/python/tests/test_torch_cuda.py"; then
    note "PASS pytest python/tests/test_torch_cuda.py (the op on CUDA tensors): $(grep -E '[0-9]+ passed' "$logs/torch-op-pytest.log" | tail -1) [${STEP_SECONDS} s]"
    local skipped
    skipped=$(grep -c "SKIPPED (no GPU)" "$logs/torch-op-pytest.log")
    ((skipped > 0)) && fail "pytest test_torch_cuda.py: $skipped test(s) SKIPPED although REQUIRE_GPU=1"
  fi
  local n=(--n 4096 16384)
  ((smoke)) && n=(--n 64)
  if run_cmd "benches/torch_op.py --device cuda" 600 torch-op-bench.log env PYTHONPATH="$work/site" \
      PYTHONUNBUFFERED=1 python3 "$root/benches/torch_op.py" --device cuda "${n[@]}" --min-seconds 0.2 \
      --modes op op-fused-v3-tf32 op-fused-v3-bf16 eager; then
    note "PASS benches/torch_op.py --device cuda [${STEP_SECONDS} s]"
  fi
}

step_loss_table() {
  local args targs
  if ((smoke)); then
    args=(--n 64 100 --d 16 --min-seconds 0); targs=(--n 64 100 --d 16 --min-seconds 0)
  else
    # The float64 truth on the host up to N = 16,384 (at 65,536 it alone would take the budget).
    args=(--n 4096 16384 65536 262144 --d 128 --min-seconds 0.2 --check-max-n 16384)
    targs=(--n 4096 16384 65536 262144 --d 128 --min-seconds 0.2 --check-max-n 16384)
  fi
  if run_cmd "bench-loss --device cuda" 95 bench-loss-cuda.log \
      "$bin/invaspread" bench-loss --device cuda "${args[@]}"; then
    note "PASS bench-loss --device cuda (every version checked against float64 first) [${STEP_SECONDS} s]"
  fi
  if ((have_torch)); then
    # Eager at every size first, then torch.compile (cold, a compilation per size) until the
    # step's budget is spent.
    local left=$(( step_deadline - $(date +%s) - 15 ))
    ((left < 5)) && left=5
    if run_cmd "benches/torch_reference.py" 600 torch-reference-cuda.log env PYTHONUNBUFFERED=1 \
        python3 benches/torch_reference.py --device cuda "${targs[@]}" --deadline-s "$left"; then
      note "PASS benches/torch_reference.py --device cuda (eager, compile where time was left) [${STEP_SECONDS} s]"
    fi
  else
    torch_missing benches/torch_reference.py
  fi
  if [[ -n "${NCU:-}" ]] && command -v ncu > /dev/null; then
    "$bin/invaspread" random --n 4096 --d 128 --out "$work/z4096.npy" > /dev/null 2>&1
    for version in fused-v2 fused-v3-tf32; do
      if run_cmd "ncu $version" 180 "ncu-$version.txt" ncu --clock-control none -k regex:instance_loss_ --set basic \
          "$bin/invaspread" loss --input "$work/z4096.npy" --device cuda --loss "$version" --grad-out "$work/dz4096.npy"; then
        note "PASS ncu profile of $version (logs/ncu-$version.txt)"
      fi
    done
  fi
}

step_train_step() {
  local args targs
  if ((smoke)); then args=(--models convnet-small --batch 2 --steps 1 --precision f32); targs=(--models convnet-small --steps 1)
  else args=(--steps 10); targs=(--steps 10); fi
  if run_cmd "bench-train --device cuda" 55 bench-train-cuda.log "$bin/invaspread" bench-train --device cuda "${args[@]}"; then
    note "PASS bench-train --device cuda (both encoders, every precision, each first step checked) [${STEP_SECONDS} s]"
  fi
  if ((have_torch)); then
    for amp in none bf16; do
      if run_cmd "torch_train_reference.py --amp $amp" 25 "torch-train-cuda-$amp.log" \
          env PYTHONUNBUFFERED=1 python3 benches/torch_train_reference.py --device cuda --amp $amp "${targs[@]}"; then
        note "PASS benches/torch_train_reference.py --device cuda --amp $amp [${STEP_SECONDS} s]"
      fi
    done
  else
    torch_missing benches/torch_train_reference.py
  fi
}

step_cifar() {
  local data args
  if ((smoke)); then
    data="$bundle/data/cifar10-smoke.tar.gz"
    args=(--model convnet-small --epochs 2 --batch 16 --k 10 --image-size 16 --no-pixel-baseline)
  else
    data="$bundle/data/cifar10-jpg.tar.gz"
    args=(--model resnet18-cifar --epochs 2 --batch 128 --no-pixel-baseline)
  fi
  if [[ ! -f "$data" ]]; then
    fail "cifar: $data is not in the bundle (scripts/device-bundle copies it from ../shared)"
  elif run_cmd "CIFAR-10 training on CUDA" 600 cifar-gpu.log "$bin/invaspread" train --device cuda \
      --dataset folder --data-dir "$data" "${args[@]}" --seed 0 --out "$logs/cifar-gpu"; then
    note "PASS CIFAR-10 $(basename "$data") ${args[*]} on CUDA: ${STEP_SECONDS} s wall"
  fi
  rm -f "$logs"/cifar-gpu/*.safetensors   # 45 MB each for resnet18; the curve is what matters
}

step_gpu_tests() {
  need_exe test-gpu || return
  if ((smoke)); then
    run_tests "test-gpu others" 600 "$bin/test-gpu" nn::sanitizer_sized_ops \
      cli::bench_loss_over_two_ranks_checks_every_version dist::collectives_across_2_processes
  else
    run_tests "test-gpu others" 600 "$bin/test-gpu" normalize:: nn:: cli:: dist:: train_ranks::
  fi
  if [[ "$only_gpu_tests" != 1 ]]; then
    for t in "$bin"/test-* "$bin"/unit-lib-*; do
      [[ -x "$t" ]] || continue
      local name
      name=$(basename "$t")
      # test-emulated tests the emulator itself (CI runs it); it has no meaning on a real GPU.
      [[ "$name" == test-gpu || "$name" == test-emulated ]] && continue
      run_tests "$name" 600 "$t"
    done
  fi
}

step_bench_checks() {
  # The criterion benches once per case (--test): each checks its output before it would time.
  if ((smoke)); then
    note "SKIP bench-checks: CI runs them on the virtual GPU through cargo test (SMOKE=1)"
    return
  fi
  local b
  for b in bench-instance_loss bench-train_step; do
    need_exe "$b" || continue
    if run_cmd "$b --test" 600 "$b.log" "$bin/$b" --test; then
      note "PASS $b --test: $(grep -c '^Success' "$logs/$b.log") cases checked [${STEP_SECONDS} s]"
    fi
  done
}

step_sanitizer() {
  if ((virtual)); then
    note "SKIP sanitizer: the virtual GPU's own memcheck and racecheck ran inside every step above (compute-sanitizer needs a real GPU)"
    return
  fi
  if ! command -v compute-sanitizer > /dev/null; then
    note "SKIP sanitizer: compute-sanitizer is not installed on this machine (PATH: $PATH)"
    return
  fi
  # Only this crate's kernels (not cuBLAS's): one --kernel-name filter per kernel of
  # kernels/*.cu (kernels.txt, by scripts/kernel-names). Whether this compute-sanitizer takes
  # several is probed on `true` first; if not, every kernel is checked, cuBLAS's too.
  local filters=() k
  while read -r k; do [[ -n "$k" ]] && filters+=(--kernel-name "kne=$k"); done < "$bundle/kernels.txt"
  if ! compute-sanitizer --version > "$logs/sanitizer-version.log" 2>&1; then
    note "SKIP sanitizer: compute-sanitizer does not run here (logs/sanitizer-version.log: $(head -1 "$logs/sanitizer-version.log"))"
    return
  fi
  if compute-sanitizer --tool memcheck "${filters[@]}" true > "$logs/sanitizer-filter-probe.log" 2>&1 \
      && grep -q "ERROR SUMMARY" "$logs/sanitizer-filter-probe.log"; then
    note "compute-sanitizer: checking this crate's $(( ${#filters[@]} / 2 )) kernels only"
  else
    note "compute-sanitizer: --kernel-name filters refused (logs/sanitizer-filter-probe.log); checking every kernel"
    filters=()
  fi
  # By value: memcheck of the loss and the ops first, racecheck after, normalize last.
  local spec tool filter log
  for spec in memcheck:loss::sanitizer_sized_cases memcheck:nn::sanitizer_sized_ops \
      racecheck:loss::sanitizer_sized_cases racecheck:nn::sanitizer_sized_ops \
      memcheck:normalize:: racecheck:normalize::; do
    tool=${spec%%:*}; filter=${spec#*:}
    log="sanitizer-$tool-${filter//:/}.log"
    if run_cmd "compute-sanitizer $tool $filter" 600 "$log" \
        compute-sanitizer --tool "$tool" --error-exitcode 3 "${filters[@]}" "$bin/test-gpu" --test-threads=1 "$filter"; then
      note "PASS compute-sanitizer $tool $filter: $(grep -E 'ERROR SUMMARY' "$logs/$log" | tail -1) [${STEP_SECONDS} s]"
    fi
  done
}

for st in $steps; do
  run_named_step "$st"
done
