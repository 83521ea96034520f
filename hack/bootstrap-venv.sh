#!/usr/bin/env bash
# Creates .venv (inside the repo, git-ignored) with every Python dependency of the
# project. Downloads are cached by uv outside the repo (~/.cache/uv), so a fresh
# clone on a machine that ran this before installs in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "error: $PY not found. kubetune needs Python >= 3.11 (set PYTHON=/path/to/python3.11)." >&2; exit 1; }
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "error: $("$PY" --version) is too old; kubetune needs Python >= 3.11 (set PYTHON=...)." >&2; exit 1; }

STAMP=.venv/.kubetune-installed
WANT=$(cat pyproject.toml hack/bootstrap-venv.sh | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then exit 0; fi

echo ">> setting up .venv (Python dependencies; the first time downloads ~4 GB of torch wheels)"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "uv>=0.5"
UV=".venv/bin/uv"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$HOME/.cache/uv}" VIRTUAL_ENV="$PWD/.venv"
# DeepSpeed's build reads the installed torch, so torch comes first and DeepSpeed builds without isolation.
"$UV" pip install --python .venv/bin/python "torch>=2.5" setuptools wheel
"$UV" pip install --python .venv/bin/python --no-build-isolation-package deepspeed -e '.[operator,train,serve,semantic,dev]'
echo "$WANT" > "$STAMP"
