#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (idempotently),
# then runs ruff, mypy (strict on src/) and pytest (warnings are errors).
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=""
for tool in gcc clang x86_64-w64-mingw32-gcc i686-w64-mingw32-gcc strip; do
  command -v "$tool" >/dev/null 2>&1 || need_apt=1
done
[ -e /usr/lib/gcc/x86_64-linux-gnu/12/32/crtbegin.o ] || [ -d /usr/lib32 ] || need_apt=1
if [ -n "$need_apt" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      gcc clang gcc-multilib binutils gcc-mingw-w64-x86-64 gcc-mingw-w64-i686 >/dev/null
  else
    echo "warning: compilers missing and not root; some fixture builds will be skipped" >&2
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/lint-imports
# The store suite also runs on PostgreSQL: as root, start a throwaway server (reused when already
# running, stopped again at exit when this run started it) and require those tests to run.
if [ -z "${EARMARK_TEST_POSTGRES_URL:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    bash scripts/postgres.sh status || trap 'bash scripts/postgres.sh stop' EXIT
    EARMARK_TEST_POSTGRES_URL=$(bash scripts/postgres.sh start)
    export EARMARK_TEST_POSTGRES_URL EARMARK_TEST_REQUIRE_POSTGRES=1
  else
    echo "warning: not root and EARMARK_TEST_POSTGRES_URL unset; PostgreSQL tests will skip" >&2
  fi
fi
.venv/bin/python -m pytest "$@"
