#!/usr/bin/env bash
# The one prepared script for the GPU machine (H100/H200, no network), in stages. From the repository root:
#
#     bash bench/gpu_check.sh            # results under $OUT (default: ./gpu_check_out)
#     bash bench/gpu_check.sh --smoke    # (or SMOKE=1) every stage in its CPU smoke form, see below
#
# Stages, in order of what counts; each writes its results under $OUT as soon as it ends, so a run cut
# short still returns what it reached:
#   env       GPU name, driver, CUDA/torch/triton versions, commit, date     -> env.json
#   install   the CUDA extension for sm_90 only (TAOPD_BUILD_CUDA=1)         -> (status in summary.json)
#   headline  gemm, triton, cuda, naive at N=8192, V=151,936, bf16, K=16, keep 0.05, D_s=2048, D_t=4096,
#             median of 3, one pinned Triton config per kernel (TAOPD_TRITON_PIN_CONFIG=1)
#                                                                            -> headline_gpu.json, .md
#   pytest    the GPU correctness tests (-m gpu), Triton's first, pinned config -> pytest_gpu.txt
#   sweep     the wider vocabulary sweep, if time is left                    -> vocab_sweep_gpu.json
#   throughput the driver's step throughput, if time is left                 -> throughput.json
# summary.json (every stage: status, seconds; and the env metadata) is rewritten after every stage.
# The whole script stays within GPU_CHECK_DEADLINE_S (default 300 s) so that one rerun fits a 15-minute
# device budget with the machine's start. GPU_CHECK_SKIP=install,pytest,... skips stages by name.
#
# Smoke mode (CI, no GPU; tests/test_scripts_smoke.py): the same stages with the same commands, each
# script given --smoke (tiny shapes on the CPU), the install stage without the build (its availability
# check only), pytest collecting the -m gpu selection without running it; exits 1 if a stage failed.
set -u
SMOKE=${SMOKE:-0}
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
SMOKE_FLAG=""
(( SMOKE )) && SMOKE_FLAG="--smoke"
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
DEADLINE=${GPU_CHECK_DEADLINE_S:-300}
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # the source tree works even if the install fails
export TAOPD_TRITON_PIN_CONFIG=${TAOPD_TRITON_PIN_CONFIG:-1}
: >"$LOG"
STAGES=()
FAILED=0

summary() {  # rewrite summary.json from the stages so far
  python3 - "$OUT" "${STAGES[@]}" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
try:
    env = json.loads((out / "env.json").read_text())
except (OSError, ValueError):
    env = {}
stages = [dict(zip(("stage", "status", "rc", "seconds"), s.split("|"))) for s in sys.argv[2:]]
(out / "summary.json").write_text(json.dumps({"env": env, "stages": stages}, indent=1))
EOF
}

stage() {  # stage NAME MAX_SECONDS COMMAND...   (the limit is cut to what the deadline leaves)
  local name=$1 max=$2; shift 2
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
    STAGES+=("$name|skipped|-|0"); summary; return 1
  fi
  local left=$(( DEADLINE - (SECONDS - START) - 10 ))
  local limit=$(( max < left ? max : left ))
  if (( limit < 5 )); then
    STAGES+=("$name|no time left|-|0"); summary; return 1
  fi
  local t0=$SECONDS rc status
  echo "=== [$name] $* (limit ${limit}s) ===" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
  rc=$?
  if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=timeout; else status=failed; fi
  (( rc == 0 )) || FAILED=$(( FAILED + 1 ))
  STAGES+=("$name|$status|$rc|$(( SECONDS - t0 ))")
  summary
  echo "=== [$name] $status rc=$rc in $(( SECONDS - t0 ))s ===" | tee -a "$LOG"
  tail -n 4 "$LOG" | sed 's/^/    /'
  return "$rc"
}

env_stage() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 bench/_meta.py cuda >"$OUT/env.json" && cat "$OUT/env.json"
}

install_stage() {
  if [[ -z "$SMOKE_FLAG" ]]; then
    TORCH_CUDA_ARCH_LIST=9.0 TAOPD_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
      python3 -m pip install -q --no-build-isolation --no-deps --no-index -e .
  fi
  python3 -c "import taopd_kernels, torch; d=torch.device('cuda'); \
print({n: taopd_kernels.backend_available(n, d) for n in ('torch', 'triton', 'cuda')})"
}

headline_stage() {
  python3 bench/vocab_sweep.py --device cuda --vocab 151936 --impls gemm,triton,cuda,naive --tokens 8192 \
    --d-student 2048 --d-teacher 4096 --dtype bfloat16 --top-k 16 --keep-ratio 0.05 --repeats 3 --warmup 1 \
    --out "$OUT" --name headline_gpu --no-progress $SMOKE_FLAG
}

pytest_stage() {
  python3 -m pytest -m gpu -q -p no:cacheprovider -rs ${SMOKE_FLAG:+--collect-only} \
    tests/test_triton.py tests/test_cuda.py tests/test_bench.py 2>&1 | tee "$OUT/pytest_gpu.txt"
  return "${PIPESTATUS[0]}"
}

export OUT SMOKE_FLAG
export -f env_stage install_stage headline_stage pytest_stage
stage env 20 env_stage
stage install 100 install_stage
stage headline 100 headline_stage
stage pytest 80 pytest_stage
stage sweep 60 python3 bench/vocab_sweep.py --device cuda --out "$OUT" --name vocab_sweep_gpu --repeats 3 \
  --warmup 1 --no-progress $SMOKE_FLAG
stage throughput 40 python3 bench/throughput.py --out "$OUT/throughput.json" $SMOKE_FLAG

echo "gpu_check.sh: $(( SECONDS - START ))s of a ${DEADLINE}s deadline" | tee -a "$LOG"
# At most 8 files come back: keep the ones that count, bundle the rest.
keep=(summary.json env.json headline_gpu.json headline_gpu.md pytest_gpu.txt vocab_sweep_gpu.json throughput.json)
mapfile -t extra < <(cd "$OUT" && find . -type f ! -name gpu_check.log | sed 's#^\./##' | sort | while read -r f; do
  [[ " ${keep[*]} " == *" $f "* ]] || echo "$f"; done)
if (( ${#extra[@]} )); then
  (cd "$OUT" && tar -czf extras.tar.gz "${extra[@]}" gpu_check.log && rm -f "${extra[@]}" gpu_check.log)
fi
(( SMOKE && FAILED )) && exit 1
exit 0
