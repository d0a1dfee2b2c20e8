#!/usr/bin/env bash
# The one prepared script for the GPU machine (H100/H200, no network). From the repository root:
#
#     bash bench/gpu_check.sh            # writes everything under $OUT (default: ./gpu_check_out)
#
# Steps (each under its own `timeout`, all of them under one overall deadline; a failing step does not
# stop the next, and every step's status is reported at the end, in $OUT/summary.txt too):
#   env      nvidia-smi, python, torch, triton
#   wheels   carried wheels from .whl/ (e.g. liger-kernel) into /tmp/site, on PYTHONPATH
#   install  pip install --no-build-isolation --no-deps -e . with TAOPD_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0
#   pytest   python -m pytest -m gpu
#   sweep    python bench/vocab_sweep.py at Qwen scale (N=8192, D_s=2048, D_t=4096, bf16), all implementations
#   cudabench  python bench/cuda_stats_bench.py            (if the file exists)
#   throughput python bench/throughput.py --out $OUT/throughput.json   (if the file exists)
# Outputs (at most 8 files): summary.txt, gpu_check.log (every step's output), vocab_sweep_gpu.{json,csv,md,png},
# throughput.json. GPU_CHECK_SKIP=install,pytest,... skips steps by name;
# SWEEP_REPEATS / SWEEP_WARMUP / SWEEP_ARGS tune the sweep.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
DEADLINE=${GPU_CHECK_DEADLINE_S:-440}   # whole script, seconds (the machine's budget is ~8 minutes)
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # the source tree works even if the install fails
: >"$LOG"
STATUS=()

step() {  # step NAME MAX_SECONDS COMMAND...   (the timeout is cut to what the deadline leaves)
  local name=$1 max=$2; shift 2
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
    absent "$name" "GPU_CHECK_SKIP"
    return 1
  fi
  local left=$(( DEADLINE - (SECONDS - START) - 15 ))
  local limit=$(( max < left ? max : left ))
  if (( limit < 5 )); then
    STATUS+=("$(printf '%-11s SKIPPED  (no time left before the %ss deadline)' "$name" "$DEADLINE")")
    return 1
  fi
  local t0=$SECONDS rc
  echo "=== [$name] $* (timeout ${limit}s) ===" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1   # bash -c: runs the functions too
  rc=$?
  local took=$(( SECONDS - t0 )) what
  if (( rc == 0 )); then what="ok"
  elif (( rc == 124 || rc == 137 )); then what="TIMEOUT"
  else what="FAILED"
  fi
  STATUS+=("$(printf '%-11s %-8s rc=%-3s %4ss' "$name" "$what" "$rc" "$took")")
  echo "=== [$name] $what rc=$rc in ${took}s ===" | tee -a "$LOG"
  tail -n 5 "$LOG" | sed 's/^/    /'
  return "$rc"
}

absent() {  # absent NAME WHY
  STATUS+=("$(printf '%-11s SKIPPED  (%s)' "$1" "$2")")
  echo "=== [$1] skipped: $2 ===" | tee -a "$LOG"
}

env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  python3 - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton missing:", exc)
EOF
}

install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

install_package() {
  TORCH_CUDA_ARCH_LIST=9.0 TAOPD_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install --no-build-isolation --no-deps --no-index -e .
  python3 -c "import taopd_kernels, torch; d=torch.device('cuda'); \
print({n: taopd_kernels.backend_available(n, d) for n in ('torch', 'triton', 'cuda')})"
}

export -f env_report install_wheels install_package
step env 30 env_report

if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 60 install_wheels && export PYTHONPATH=/tmp/site:$PYTHONPATH
else
  absent wheels "no .whl/*.whl carried (liger will be skipped); see bench/README.md"
fi

step install 150 install_package

step pytest 90 python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests

step sweep 180 python3 bench/vocab_sweep.py --device cuda --out "$OUT" --name vocab_sweep_gpu \
  --repeats "${SWEEP_REPEATS:-5}" --warmup "${SWEEP_WARMUP:-2}" --no-progress ${SWEEP_ARGS:-}
if [[ -f "$OUT/vocab_sweep_gpu.json" && ! -f "$OUT/vocab_sweep_gpu.png" ]]; then
  step replot 30 python3 bench/vocab_sweep.py --replot "$OUT/vocab_sweep_gpu.json"   # after a timeout
fi

if [[ -f bench/cuda_stats_bench.py ]]; then
  step cudabench 45 python3 bench/cuda_stats_bench.py
else
  absent cudabench "bench/cuda_stats_bench.py does not exist"
fi

if [[ -f bench/throughput.py ]]; then
  step throughput 60 python3 bench/throughput.py --out "$OUT/throughput.json"
else
  absent throughput "bench/throughput.py does not exist"
fi

{
  echo "gpu_check.sh: $(date -Is), $(( SECONDS - START ))s of a ${DEADLINE}s deadline"
  printf '%s\n' "${STATUS[@]}"
} | tee "$SUMMARY" | tee -a "$LOG"

# At most 8 files come back, flat or one folder deep: bundle the extras if there are more.
mapfile -t files < <(cd "$OUT" && find . -type f | sort)
if (( ${#files[@]} > 8 )); then
  keep=(./summary.txt ./gpu_check.log ./vocab_sweep_gpu.json ./vocab_sweep_gpu.png ./vocab_sweep_gpu.md)
  extra=()
  for f in "${files[@]}"; do [[ " ${keep[*]} " == *" $f "* ]] || extra+=("$f"); done
  (cd "$OUT" && tar -czf extras.tar.gz "${extra[@]}" && rm -f "${extra[@]}")
  echo "bundled ${#extra[@]} files into extras.tar.gz" | tee -a "$SUMMARY"
fi
exit 0
