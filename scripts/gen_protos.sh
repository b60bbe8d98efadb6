#!/usr/bin/env bash
# Regenerate the Python gRPC stubs in tail_service/proto/ from proto/*.proto.
#   bash scripts/gen_protos.sh [OUT_DIR]     (tests call it with a temp dir to check the stubs are current)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${1:-$ROOT/tail_service/proto}
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -I "$ROOT/proto" --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "$ROOT"/proto/auth.proto "$ROOT"/proto/secrets.proto
# protoc emits absolute imports ("import auth_pb2"); make them package-relative.
for f in "$OUT"/*_pb2_grpc.py; do
  sed -i -E 's/^import ([a-z_]+_pb2) as /from . import \1 as /' "$f"
done
touch "$OUT/__init__.py"
