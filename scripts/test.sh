#!/usr/bin/env bash
# Install what the tests need and run the whole suite: lint, types, tests.
source "$(dirname "$0")/_venv.sh" "[dev,local]"
cd "$ROOT"
# promtool (from Debian's prometheus package, a static binary) lints our /metrics output in
# tests/observability; fetched once into $VENV/tools. Without it that test is skipped, except
# under CI (env CI set), where it fails.
PROMTOOL="$VENV/tools/promtool"
if [ ! -x "$PROMTOOL" ]; then
  if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    dl=$(mktemp -d)
    if (cd "$dl" && apt-get download prometheus >"$dl/log" 2>&1) && dpkg -x "$dl"/prometheus_*.deb "$dl/x"; then
      mkdir -p "$VENV/tools"
      cp "$dl/x/usr/bin/promtool" "$PROMTOOL"
    else
      echo "note: 'apt-get download prometheus' failed, so there is no promtool:" >&2
      cat "$dl/log" >&2
    fi
    rm -rf "$dl"
  else
    echo "note: apt-get is not available: no promtool for the /metrics lint test" \
      "(install Prometheus' promtool and set TAIL_PROMTOOL, or put it at $PROMTOOL)" >&2
  fi
fi
export TAIL_PROMTOOL="${TAIL_PROMTOOL:-$PROMTOOL}"
"$VENV/bin/ruff" check tail_service tests examples
"$VENV/bin/ruff" format --check tail_service tests examples
"$VENV/bin/mypy"
# A private temp root: pytest prunes old run directories under the shared default one.
BASETEMP=$(mktemp -d "${TMPDIR:-/tmp}/tail-pytest.XXXXXX")
trap 'rm -rf "$BASETEMP"' EXIT
"$VENV/bin/pytest" --basetemp="$BASETEMP/t" "$@"
