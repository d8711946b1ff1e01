#!/usr/bin/env bash
# Every GPU check of docs/benchmarks.md in one run on a lent GPU machine, from the repository root:
#   bash bench/gpu_wheels.sh                          # here, once per checkout (fills .whl/)
#   device run: bash bench/gpu_check.sh [STAGE ...]   # carry [".whl"], timeout_s 590
# Stages (default all, in this order; each has its own time limit):
#   tests    pytest -m gpu                                                  (~2 min)
#   engine   ViT-L-14-336 at 518 px, bf16, dual-branch: batch 1, 8, 32 and pipelined,
#            with the naive loop and the fp32 twin beside it                 (~3 min)
#   compile  the same with compile = true (CUDA graphs), no naive loop       (~3 min)
#   agent    4 synthetic cameras x 30 fps through `genclip run`, ViT-L-14-336 at 518 px bf16
#            (eager: compiling four batch shapes would not fit), real Mosquitto and Redis on loopback (~2 min)
# Output: $OUT (the device tool's folder) or ./gpu-out: one file per stage.
# GPU_CHECK_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh: the same plumbing here, on the CPU with
# genclip-tiny (a check of this script, not a figure).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests engine compile agent)

py=${PYTHON:-python3}
smoke=${GPU_CHECK_SMOKE:-0}
if [ -d .whl ] && [ "$smoke" != 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    for deb in .whl/debs/*.deb; do dpkg -x "$deb" /tmp/brokers; done
    export PATH=/tmp/brokers/usr/sbin:/tmp/brokers/usr/bin:$PATH
    export LD_LIBRARY_PATH=/tmp/brokers/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

{ nvidia-smi; "$py" -c 'import torch, open_clip; print(torch.__version__, open_clip.__version__)'; } >"$out/machine.txt" 2>&1
L14=(--backbone ViT-L-14-336 --image-size 518 --device cuda --precision bf16)
cameras=(--cameras 4 --fps 30)
[ "$smoke" = 1 ] && L14=(--backbone genclip-tiny --image-size 224 --device cpu --precision fp32) && cameras=(--cameras 2 --fps 5)
for stage in "${stages[@]}"; do
    echo "== $stage $(date -u +%FT%TZ)"
    case $stage in
        tests)
            timeout 170 "$py" -m pytest -m gpu -q -p no:cacheprovider tests >"$out/pytest-gpu.txt" 2>&1
            ;;
        engine)
            timeout 240 "$py" -m cli bench engine "${L14[@]}" --batch 1 --batch 8 --batch 32 --pipelined \
                --rounds 3 --json >"$out/engine-l14-bf16.json" 2>"$out/engine-l14-bf16.log"
            ;;
        compile)
            timeout 240 "$py" -m cli bench engine "${L14[@]}" --batch 8 --batch 32 --pipelined --compile --no-naive \
                --rounds 3 --json >"$out/engine-l14-bf16-compiled.json" 2>"$out/engine-l14-bf16-compiled.log"
            ;;
        agent)
            timeout 200 "$py" -m cli bench agent "${cameras[@]}" --seconds 30 --warmup 20 "${L14[@]}" --threads 8 --json \
                >"$out/agent-l14-4x30.json" 2>"$out/agent-l14-4x30.log"
            ;;
        *)
            echo "unknown stage $stage (tests, engine, compile, agent)"
            exit 2
            ;;
    esac
    echo "   rc $? $(date -u +%FT%TZ)"
done
tail -3 "$out/pytest-gpu.txt" 2>/dev/null
