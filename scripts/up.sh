#!/usr/bin/env bash
# Install (once) and start the whole stack on its embedded defaults: `bash scripts/up.sh [flags]`.
source "$(dirname "$0")/_venv.sh" "[local]"
exec "$VENV/bin/tail-service" up "$@"
