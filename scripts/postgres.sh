#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the store tests (never for real data).
#
#   bash scripts/postgres.sh start    # install if needed, initdb once, start; prints the URL
#   bash scripts/postgres.sh url      # the URL of the running cluster (exit 1 when stopped)
#   bash scripts/postgres.sh status   # exit 0 when running
#   bash scripts/postgres.sh stop     # stop it (the data directory stays for the next start)
#   bash scripts/postgres.sh destroy  # stop it and delete the data directory
#
# Needs root: it installs the `postgresql` package with apt-get and runs the server as the
# `postgres` user (initdb refuses to run as root). Safe to run twice: a running cluster is reused.
# The cluster listens on 127.0.0.1 only, on a free port chosen at first start, with a random
# password for the `postgres` role; fsync is off because the data is disposable.
# EARMARK_TEST_POSTGRES_DIR overrides where the cluster lives.
set -euo pipefail

DATA_DIR=${EARMARK_TEST_POSTGRES_DIR:-${TMPDIR:-/tmp}/earmark-test-postgres}
DATABASE=earmark_test
PORT_FILE="$DATA_DIR/earmark-port"
PASSWORD_FILE="$DATA_DIR/earmark-password"

die() { echo "postgres.sh: $*" >&2; exit 1; }

pg_bin_dir() {
  # The newest installed server version (Debian keeps each under /usr/lib/postgresql/<major>).
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

as_postgres() { runuser -u postgres -- "$@"; }

install_server() {
  if [ -n "$(pg_bin_dir || true)" ]; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed and this is not root"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  [ -n "$(pg_bin_dir || true)" ] || die "installed postgresql but found no initdb"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

is_running() {
  local bin
  bin=$(pg_bin_dir) || return 1
  [ -f "$DATA_DIR/PG_VERSION" ] && as_postgres "$bin/pg_ctl" status -D "$DATA_DIR" >/dev/null 2>&1
}

print_url() {
  echo "postgresql+psycopg://postgres:$(cat "$PASSWORD_FILE")@127.0.0.1:$(cat "$PORT_FILE")/$DATABASE"
}

init_cluster() {
  local bin=$1
  mkdir -p "$DATA_DIR"
  chown postgres: "$DATA_DIR"
  chmod 700 "$DATA_DIR"
  python3 -c 'import secrets; print(secrets.token_hex(16))' > "$DATA_DIR/.pwfile"
  chown postgres: "$DATA_DIR/.pwfile"
  # initdb wants an empty directory: keep the password outside until it has run.
  mv "$DATA_DIR/.pwfile" "${DATA_DIR}.pwfile"
  as_postgres "$bin/initdb" -D "$DATA_DIR" -U postgres --pwfile="${DATA_DIR}.pwfile" \
    --auth-host=scram-sha-256 --auth-local=peer -E UTF8 --locale=C.UTF-8 >/dev/null
  mv "${DATA_DIR}.pwfile" "$PASSWORD_FILE"
  chmod 600 "$PASSWORD_FILE"
  free_port > "$PORT_FILE"
}

start() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs PostgreSQL and switches to user postgres)"
  install_server
  local bin
  bin=$(pg_bin_dir)
  [ -f "$DATA_DIR/PG_VERSION" ] || init_cluster "$bin"
  if ! is_running; then
    # The port chosen at first start may have been taken since: choose again if so.
    if ! python3 -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' \
        "$(cat "$PORT_FILE")" 2>/dev/null; then
      free_port > "$PORT_FILE"
    fi
    as_postgres "$bin/pg_ctl" start -D "$DATA_DIR" -l "$DATA_DIR/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $(cat "$PORT_FILE") -k $DATA_DIR \
          -c fsync=off -c synchronous_commit=off -c full_page_writes=off" >/dev/null \
      || { tail -n 20 "$DATA_DIR/server.log" >&2; die "the server did not start"; }
  fi
  if ! as_postgres "$bin/psql" -h "$DATA_DIR" -p "$(cat "$PORT_FILE")" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'" | grep -q 1; then
    as_postgres "$bin/createdb" -h "$DATA_DIR" -p "$(cat "$PORT_FILE")" "$DATABASE"
  fi
  print_url
}

stop() {
  if is_running; then
    as_postgres "$(pg_bin_dir)/pg_ctl" stop -D "$DATA_DIR" -m fast -w >/dev/null
  fi
}

case "${1:-start}" in
  start) start ;;
  url) is_running || die "not running"; print_url ;;
  status) is_running ;;
  stop) stop ;;
  destroy) stop; rm -rf "$DATA_DIR" ;;
  *) die "usage: $0 [start|url|status|stop|destroy]" ;;
esac
