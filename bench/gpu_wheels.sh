#!/usr/bin/env bash
# Here, before a GPU run: what the lent GPU machine lacks, into .whl/ (ignored by git, carried by the
# device tool). Its python3 (3.12) has torch, numpy, opencv, typer, rich, safetensors, huggingface_hub,
# prometheus-client and regex; it lacks open_clip and the agent's own dependencies, and the brokers.
# Then run bench/gpu_check.sh there (see its header).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl/debs
pins=$(grep -iE '^(open.clip.torch|ftfy|wcwidth|pydantic|pydantic.settings|pydantic.core|python.dotenv|structlog|paho.mqtt|redis|tomli.w|typing.inspection|annotated.types)==' constraints.txt)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl $pins
python3 -m pip wheel -q --no-deps -w .whl "$(grep -iE '^sdnotify==' constraints.txt)"  # an sdist only
(cd .whl/debs && apt-get download -q mosquitto libmosquitto1 libcjson1 libdlt2 libwrap0 \
    redis-server redis-tools libjemalloc2 liblzf1 2>/dev/null)
ls .whl .whl/debs
du -sh .whl
