#!/usr/bin/env bash
# The GPU machine's driver (issue 24): every stage has its own time limit and writes its log
# (and JSON) under $OUT, so one failing stage does not lose the others.  Run from the repo root
# after MLX's CUDA build is unpacked in /root/mlxsite (shared/gpu/README.md, steps 2-3):
#   bash benchmarks/gpu/run_all.sh [STAGES]    STAGES: a comma list of
#   env,mt,bench,suite,trainer,throughput,profile,resident,bf16  (default: all of them)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=",${1:-env,mt,bench,suite,trainer,throughput,profile,resident,bf16},"
T_MT=${T_MT:-120}; T_BENCH=${T_BENCH:-200}; T_SUITE=${T_SUITE:-300}; T_TRAINER=${T_TRAINER:-150}
T_TP=${T_TP:-150}; T_RES=${T_RES:-120}; T_PROF=${T_PROF:-120}
# install (once per machine): MLX's CUDA build from /root/mlxsite (a .pth, so that every
# subprocess sees it), the carried wheels from /root/whl, nestedfn editable (no native build)
if [ ! -f /root/.nestedfn_installed ]; then
  site=$(python3 -c "import site; print(site.getsitepackages()[0])")
  printf '/root/mlxsite\n%s\n' "$PWD" > "$site/mlxsite.pth"
  python3 -m pip install -q --no-index --no-deps --break-system-packages /root/whl/*.whl
  NESTEDFN_NATIVE_BUILD=0 python3 -m pip install -q --no-deps --no-build-isolation \
    --break-system-packages -e . && touch /root/.nestedfn_installed
fi
export PYTHONPATH=$PWD/benchmarks/gpu
export XLA_PYTHON_CLIENT_PREALLOCATE=false
stage() { case "$STAGES" in *",$1,"*) return 0;; *) return 1;; esac; }
run() {  # run NAME LIMIT CMD...: its log to $OUT/NAME.log, its exit status and seconds to status
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/status"
}
if stage env; then
  run env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python3 -c "import mlx.core as mx; print(mx.__version__, mx.default_device(), mx.cuda.is_available())";
    python3 -c "import torch, jax, optax; print(torch.__version__, jax.__version__, optax.__version__, jax.devices())";
    python3 -c "import yaml, tqdm; print(\"yaml\", yaml.__version__, \"tqdm\", tqdm.__version__)";
    python3 -c "import matplotlib; print(\"matplotlib\", matplotlib.__version__)";
    python3 -c "import pytest, hypothesis, mlx_lm; print(pytest.__version__, hypothesis.__version__, mlx_lm.__version__)";
    python3 -c "import nestedfn.fast.native as n; print(\"native module:\", n.native_module())"'
fi
if stage mt; then
  run mt "$T_MT" python3 -m pytest tests/fast/test_multitensor.py -q -s -p no:cacheprovider
fi
if stage bench; then
  run bench "$T_BENCH" python3 benchmarks/gpu/step_latency_gpu.py --rounds "${ROUNDS:-3}" \
    --iters "${ITERS:-30}" --json "$OUT/step_latency_gpu.json" ${BENCH_ARGS:-}
fi
if stage suite; then
  MODTIMES_JSON="$OUT/suite_modules.json" run suite "$T_SUITE" python3 -m pytest -p modtimes \
    -p no:cacheprovider -rfEs --durations=40 --junitxml="$OUT/suite.xml" ${SUITE_ARGS:-}
fi
if stage trainer; then
  run trainer "$T_TRAINER" python3 benchmarks/gpu/trainer_gpu.py --iters 20 --demo-steps 60 \
    --json "$OUT/trainer_gpu.json"
fi
if stage throughput; then
  run throughput "$T_TP" python3 benchmarks/train_throughput.py --iters "${TP_ITERS:-200}" \
    --rounds "${TP_ROUNDS:-2}" --json "$OUT/train_throughput_gpu.json"
fi
if stage profile; then  # where a GPU training step's host time goes (cProfile, top functions)
  run profile "$T_PROF" python3 benchmarks/gpu/profile_train.py --iters 60 --out "$OUT/profile"
fi
if stage resident; then
  run resident "$T_RES" python3 benchmarks/resident_step.py --device gpu --rounds 3
fi
if stage bf16; then  # the bfloat16 resident step's refusal on a GPU, leaf by leaf
  run bf16 60 python3 benchmarks/gpu/resident_bf16.py --steps 3
fi
cat "$OUT/status"
