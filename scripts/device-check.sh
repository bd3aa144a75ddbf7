#!/usr/bin/env bash
# Runs on a GPU machine that has device-bundle/ (from scripts/device-bundle), the NVIDIA driver
# and Python with PyTorch, but no Rust. Writes every log into the folder given as argument.
#
#   bash scripts/device-check.sh "$OUT"            # from the repository root
#
# Steps: nvidia-smi; every test binary with REQUIRE_GPU=1 (a missing GPU fails them);
# compute-sanitizer memcheck and racecheck on the GPU kernel tests (the sanitizer-sized cases);
# `invaspread bench-loss --device cuda` and benches/torch_reference.py on the same card;
# `invaspread bench-train --device cuda` and benches/torch_train_reference.py (float32 and bf16
# autocast) on the same card; resnet18-cifar on the bundled CIFAR-10 JPEG copy for 2 epochs
# (the curve in cifar-gpu/metrics.csv and steps.csv); with NCU=1, an Nsight Compute profile of the fused
# kernels. Exits non-zero when a check failed.
# SKIP_BENCH=1 leaves out the benchmarks, SKIP_CIFAR=1 the training run, ONLY_GPU_TESTS=1 runs
# only the GPU test binaries (gpu_*, cli_train) instead of all of them.
# PHASES picks the parts to run (default: all), so that a short GPU lease can run them in
# separate calls: tests sanitizer bench-loss bench-train cifar.
set -uo pipefail
logs=${1:?usage: device-check.sh LOG_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
bundle="$root/device-bundle"
mkdir -p "$logs"
# The binaries travel packed; unpack them beside the bundle (a scratch folder).
bin="$bundle/bin"
if [[ ! -d "$bin" && -f "$bundle/bin.tar.xz" ]]; then
  unpacked=$(mktemp -d)
  tar -C "$unpacked" -xJf "$bundle/bin.tar.xz"
  bin="$unpacked/bin"
fi
export REQUIRE_GPU=1 INVASPREAD_EXE="$bin/invaspread" INVASPREAD_REPO="$root"
cd "$root"
status=0
summary="$logs/summary.txt"
: > "$summary"
phases=" ${PHASES:-tests sanitizer bench-loss bench-train cifar} "
want() { [[ "$phases" == *" $1 "* ]]; }
note() { echo "$*" | tee -a "$summary"; }

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

note "commit: $(tr '\n' ' ' < "$bundle/COMMIT" 2>/dev/null)"
note "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi > "$logs/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed"
head -n 15 "$logs/nvidia-smi.txt"
"$INVASPREAD_EXE" info --kernels > "$logs/info.txt" 2>&1
head -n 12 "$logs/info.txt"

want tests && for t in "$bin"/test-* "$bin"/unit-lib-*; do
  [[ -x "$t" ]] || continue
  name=$(basename "$t")
  if [[ -n "${ONLY_GPU_TESTS:-}" && "$name" != test-gpu_* && "$name" != test-cli_train ]]; then
    continue
  fi
  if "$t" --test-threads=1 > "$logs/$name.log" 2>&1; then
    note "PASS $name: $(grep -E '^test result' "$logs/$name.log" | tail -1)"
  else
    note "FAIL $name (see $name.log)"; status=1
  fi
done

if ! want sanitizer; then
  :
elif command -v compute-sanitizer >/dev/null 2>&1; then
  for spec in "test-gpu_normalize:" "test-gpu_loss:sanitizer_sized_cases" "test-gpu_nn:sanitizer_sized_ops"; do
    exe=${spec%%:*}; filter=${spec#*:}
    [[ -x "$bin/$exe" ]] || continue
    for tool in memcheck racecheck; do
      log="$logs/sanitizer-$tool-$exe.log"
      if compute-sanitizer --tool "$tool" --error-exitcode 3 "$bin/$exe" --test-threads=1 $filter > "$log" 2>&1; then
        note "PASS compute-sanitizer $tool $exe $filter: $(grep -E 'ERROR SUMMARY' "$log" | tail -1)"
      else
        note "FAIL compute-sanitizer $tool $exe $filter (see $(basename "$log"))"; status=1
      fi
    done
  done
else
  note "compute-sanitizer not found: sanitizer checks not run"; status=1
fi

if [[ -z "${SKIP_BENCH:-}" ]] && want bench-loss; then
  if "$INVASPREAD_EXE" bench-loss --device cuda --min-seconds 0.2 > "$logs/bench-loss-cuda.md" 2> "$logs/bench-loss-cuda.err"; then
    note "ran bench-loss --device cuda"; cat "$logs/bench-loss-cuda.md"
  else
    note "FAIL bench-loss --device cuda"; status=1; tail -5 "$logs/bench-loss-cuda.err"
  fi
  if python3 benches/torch_reference.py --device cuda --min-seconds 0.2 > "$logs/torch-reference-cuda.md" 2>&1; then
    note "ran benches/torch_reference.py --device cuda"; grep '^|' "$logs/torch-reference-cuda.md"
  else
    note "FAIL benches/torch_reference.py"; status=1; tail -5 "$logs/torch-reference-cuda.md"
  fi
fi

if [[ -z "${SKIP_BENCH:-}" ]] && want bench-train; then
  if "$INVASPREAD_EXE" bench-train --device cuda --steps 10 > "$logs/bench-train-cuda.md" 2> "$logs/bench-train-cuda.err"; then
    note "ran bench-train --device cuda"; cat "$logs/bench-train-cuda.md"
  else
    note "FAIL bench-train --device cuda"; status=1; tail -5 "$logs/bench-train-cuda.err"
  fi
  for amp in none bf16; do
    if python3 benches/torch_train_reference.py --device cuda --amp $amp --steps 10 > "$logs/torch-train-cuda-$amp.md" 2>&1; then
      note "ran benches/torch_train_reference.py --device cuda --amp $amp"; grep '^|' "$logs/torch-train-cuda-$amp.md"
    else
      note "FAIL benches/torch_train_reference.py --amp $amp"; status=1; tail -5 "$logs/torch-train-cuda-$amp.md"
    fi
  done
fi

if [[ -z "${SKIP_CIFAR:-}" ]] && want cifar && [[ -f "$bundle/data/cifar10-jpg.tar.gz" ]]; then
  start=$(date +%s)
  if "$INVASPREAD_EXE" train --device cuda --dataset folder --data-dir "$bundle/data/cifar10-jpg.tar.gz" \
      --model resnet18-cifar --epochs 2 --batch 128 --seed 0 --out "$logs/cifar-gpu" > "$logs/cifar-gpu.log" 2>&1; then
    note "CIFAR-10 resnet18-cifar 2 epochs on CUDA: $(( $(date +%s) - start )) s wall"
    grep -E "initialisation|^epoch" "$logs/cifar-gpu.log" | tee -a "$summary"
  else
    note "FAIL CIFAR-10 training on CUDA (see cifar-gpu.log)"; status=1; tail -5 "$logs/cifar-gpu.log"
  fi
  rm -f "$logs"/cifar-gpu/*.safetensors   # checkpoints are 45 MB each; the curve is what matters
fi

if [[ -n "${NCU:-}" ]] && command -v ncu >/dev/null 2>&1; then
  "$INVASPREAD_EXE" random --n 4096 --d 128 --out "$logs/z4096.npy" 2>/dev/null
  ncu --clock-control none -k regex:instance_loss_ --set basic "$INVASPREAD_EXE" loss --input "$logs/z4096.npy" \
      --device cuda --kernel fused-v2 --grad-out "$logs/dz4096.npy" > "$logs/ncu-fused-v2.txt" 2>&1 \
    && note "ncu profile: ncu-fused-v2.txt" || note "ncu failed (see ncu-fused-v2.txt)"
  rm -f "$logs/z4096.npy" "$logs/dz4096.npy"
fi
note "device-check: exit $status"
exit $status
