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
.venv/bin/python -m pytest "$@"
