#!/usr/bin/env bash
# Install what the tests need and run the whole suite: lint, types, tests.
source "$(dirname "$0")/_venv.sh" "[dev,local]"
cd "$ROOT"
"$VENV/bin/ruff" check tail_service tests examples
"$VENV/bin/ruff" format --check tail_service tests examples
"$VENV/bin/mypy"
# A private temp root: pytest prunes old run directories under the shared default one.
BASETEMP=$(mktemp -d "${TMPDIR:-/tmp}/tail-pytest.XXXXXX")
trap 'rm -rf "$BASETEMP"' EXIT
"$VENV/bin/pytest" --basetemp="$BASETEMP/t" "$@"
