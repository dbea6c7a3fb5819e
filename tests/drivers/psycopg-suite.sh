#!/usr/bin/env bash
# Runs psycopg 3's own test suite (and psycopg_pool's) three times: directly
# against PostgreSQL 15, through pgwarden in transaction mode, and through
# pgwarden in session mode; then prints a table of outcomes per run and, for
# each pgwarden mode, the tests that pass directly but fail or error through
# pgwarden, with their one-line errors, grouped by likely cause
# (psycopg-suite-report.py, next to this script, writes that report).
#
# Usage:
#   cargo build --release                      # this script never builds pgwarden
#   tests/drivers/psycopg-suite.sh PSYCOPG_CHECKOUT [PGWARDEN_BIN]
#
#   PSYCOPG_CHECKOUT  a psycopg source tree: the root of the psycopg/psycopg
#                     repository at a release tag (e.g. 3.3.4), holding
#                     psycopg/, psycopg_pool/ and tests/ (the wheels on
#                     PyPI have no tests)
#   PGWARDEN_BIN      default target/release/pgwarden
#
# Everything it needs it starts itself, and removes on exit (trap), in a
# network namespace with only loopback when run as root:
#   - a throwaway PostgreSQL 15 cluster (initdb in a temp directory, a free
#     port, run as the `postgres` OS user when root, scram-sha-256 for TCP,
#     max_prepared_transactions > 0 for the two-phase-commit tests);
#   - a login user `psy` for the tests, the NOINHERIT service user
#     `pgwarden_svc` (member of `psy`), and one database per run (psy_direct,
#     psy_tx, psy_session), owned by `psy`, with hstore created;
#   - two `pgwarden serve` processes (pool.mode "transaction" and "session"),
#     each with a policy mapping `psy` to the role of its own name
#     (role = "{user}"), so objects the tests create belong to `psy` in every
#     run and the direct run is a fair baseline;
#   - a Python venv (target/psycopg-suite/venv, or $PSYCOPG_SUITE_VENV) with
#     psycopg and psycopg_pool installed from the checkout, its `[test]` extra
#     and pytest-timeout, from PyPI. psycopg runs as its pure-Python
#     implementation (PSYCOPG_IMPL=python) on the system's libpq (libpq5).
#
# Results (JUnit XML, pytest output, gateway and PostgreSQL logs, report.md)
# go to target/psycopg-suite/results (or $PSYCOPG_SUITE_OUT); each run
# replaces the files of the runs it repeats.
#
# Knobs (environment):
#   PSYCOPG_SUITE_RUNS     runs to do, default "direct tx session"; a run left
#                          out keeps its previous results, which the report
#                          then uses (e.g. re-run only "tx" after a fix)
#   PSYCOPG_SUITE_POOL     1 (default) also runs tests/pool; 0 skips it
#   PSYCOPG_SUITE_TESTS    the test files/directories of the main suite,
#                          relative to the checkout, e.g. "tests" for all;
#                          default: those of the protocol-heavy files that
#                          exist: tests/test_{connection,cursor,copy,pipeline,
#                          prepared,transaction,notify,tpc}*.py,
#                          test_errors.py, test_encodings.py, test_adapt.py
#                          and tests/pq/
#   PSYCOPG_SUITE_MARKERS  pytest -m expression, default
#                          "not slow and not timing and not flakey"
#   PSYCOPG_SUITE_TIMEOUT  per-test timeout in seconds (pytest-timeout), 60
#   PSYCOPG_SUITE_POOL_SIZE  pgwarden pool.size, default 8
#   PSYCOPG_SUITE_ALLOW_DYNAMIC_SQL  1: the gateways get [identity]
#                          allow_dynamic_sql = true (default: pgwarden's
#                          default, false, which refuses psycopg's tests that
#                          EXECUTE computed SQL in DO blocks)
#   PSYCOPG_SUITE_PYTEST_ARGS  extra pytest arguments (e.g. "-x" or "-k copy")
#   PSYCOPG_SUITE_NETNS    0: do not run in a loopback-only network namespace
#                          (by default, as root, everything after the venv
#                          step runs in one, so no test reaches past this
#                          machine; the few known tests that try are
#                          deselected either way)
#   PSYCOPG_SUITE_HOLD     1: after the runs, start both gateways, print the
#                          DSNs and keep everything up until SIGINT/SIGTERM
#                          (for reproducing a failure by hand; with
#                          PSYCOPG_SUITE_RUNS="" it runs no test at all)
#
# A hung test fails after PSYCOPG_SUITE_TIMEOUT seconds and the run goes on;
# a run that dies (or exceeds 3 hours) writes no XML, and the report says so.
#
# Exit status: 0 when the runs completed (whatever the tests' outcome),
# 1 when something could not be set up, 2 for usage errors.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage
case $1 in -h | --help) usage ;; esac

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
checkout=$(cd "$1" && pwd) || { echo "psycopg-suite: no such directory: $1" >&2; exit 2; }
bin=${2:-$root/target/release/pgwarden}
case $bin in /*) ;; *) bin=$PWD/$bin ;; esac
[ -x "$bin" ] || { echo "psycopg-suite: $bin is not an executable (run cargo build --release first)" >&2; exit 2; }
for d in psycopg psycopg_pool tests; do
  [ -d "$checkout/$d" ] || { echo "psycopg-suite: $checkout has no $d/: not a psycopg source tree" >&2; exit 2; }
done

runs=${PSYCOPG_SUITE_RUNS-direct tx session}
with_pool=${PSYCOPG_SUITE_POOL:-1}
markers=${PSYCOPG_SUITE_MARKERS:-not slow and not timing and not flakey}
timeout=${PSYCOPG_SUITE_TIMEOUT:-60}
pool_size=${PSYCOPG_SUITE_POOL_SIZE:-8}
dynamic_sql=false
[ "${PSYCOPG_SUITE_ALLOW_DYNAMIC_SQL:-0}" = 1 ] && dynamic_sql=true
venv=${PSYCOPG_SUITE_VENV:-$root/target/psycopg-suite/venv}
out=${PSYCOPG_SUITE_OUT:-$root/target/psycopg-suite/results}
PG_BIN=/usr/lib/postgresql/15/bin
psql=$PG_BIN/psql
[ -x "$psql" ] || psql=$(command -v psql)
for r in $runs; do
  case $r in direct | tx | session) ;; *) echo "psycopg-suite: unknown run '$r' (direct, tx, session)" >&2; exit 2 ;; esac
done

say() { echo "psycopg-suite: $*" >&2; }
die() { say "$*"; exit 1; }
[ -x "$PG_BIN/initdb" ] || die "no PostgreSQL 15 at $PG_BIN (bash scripts/setup.sh installs it)"

# The main suite's files: those of this list that exist in the checkout.
if [ -n "${PSYCOPG_SUITE_TESTS:-}" ]; then
  read -r -a tests <<<"$PSYCOPG_SUITE_TESTS"
else
  tests=()
  for pat in test_connection*.py test_cursor*.py test_copy*.py test_pipeline*.py \
    test_prepared*.py test_transaction*.py test_notify*.py test_errors.py \
    test_encodings.py test_adapt.py test_tpc*.py; do
    for f in "$checkout"/tests/$pat; do
      [ -f "$f" ] && tests+=("tests/${f##*/}")
    done
  done
  [ -d "$checkout/tests/pq" ] && tests+=(tests/pq)
fi
# test_cursor*.py already covers test_cursor_server*.py; dedupe anyway.
mapfile -t tests < <(printf '%s\n' "${tests[@]}" | awk '!seen[$0]++')
[ "${#tests[@]}" -gt 0 ] || die "no test files selected"
# Tests that try to reach past this machine (TCP to 192.0.2.1 and
# 198.51.100.1, a DNS lookup of nosuchhost.example.com): never run.
deselect=()
for t in test_connection.py::test_connect_error_multi_hosts_each_message_preserved \
  test_connection_async.py::test_connect_error_multi_hosts_each_message_preserved \
  test_connection.py::test_resolve_error_host test_connection_async.py::test_resolve_error_host; do
  deselect+=(--deselect "tests/$t")
done

# ---------------------------------------------------------------- python
# (Done before entering the network namespace below: it needs PyPI.)
if [ "${PSYCOPG_SUITE_NETNS:-}" != 1 ]; then
  say "venv $venv"
  stamp=$venv/.psycopg-suite-stamp
  want_stamp=$(cat "$checkout/psycopg/pyproject.toml" "$checkout/psycopg_pool/pyproject.toml" | sha256sum | cut -d' ' -f1)
  if ! [ -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
    say "installing psycopg[test], psycopg_pool and pytest-timeout from $checkout"
    if [ -e "$venv" ] && ! [ -f "$venv/pyvenv.cfg" ]; then
      die "$venv exists and is not a venv; not replacing it"
    fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      "$checkout/psycopg[test]" "$checkout/psycopg_pool" pytest-timeout
    echo "$want_stamp" >"$stamp"
  else
    # The dependencies are there; the checkout's code may have changed.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall \
      "$checkout/psycopg" "$checkout/psycopg_pool"
  fi
fi
export PSYCOPG_IMPL=python
if ! (cd / && "$venv/bin/python" -c 'import psycopg' 2>/dev/null); then
  if [ "$(id -u)" = 0 ]; then
    say "psycopg cannot load libpq: apt-get install libpq5"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpq5 >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpq5 >/dev/null; }
  fi
  (cd / && "$venv/bin/python" -c 'import psycopg') || die "psycopg (PSYCOPG_IMPL=python) cannot be imported: is libpq5 installed?"
fi
psy_version=$(cd / && "$venv/bin/python" -c 'import psycopg, psycopg_pool; from psycopg import pq; print(f"psycopg {psycopg.__version__}, psycopg_pool {psycopg_pool.__version__}, impl {pq.__impl__}, libpq {pq.version()}")')
say "$psy_version"

# ---------------------------------------------------------------- network
# Everything from here on runs in a network namespace of its own with only
# loopback up, so that no test can reach past this machine (a few psycopg
# tests connect to documentation addresses or resolve names on purpose;
# there they fail at once, directly and through pgwarden alike).
# PSYCOPG_SUITE_NETNS=0 skips this.
if [ -z "${PSYCOPG_SUITE_NETNS:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null &&
    unshare --net true 2>/dev/null; then
    say "entering a network namespace with loopback only"
    export PSYCOPG_SUITE_NETNS=1
    exec unshare --net -- bash -c 'ip link set lo up && exec bash "$@"' bash "$0" "$@"
  fi
  say "warning: no loopback-only network namespace (needs root, unshare and ip):"
  say "  only the known tests that reach out are deselected"
  PSYCOPG_SUITE_NETNS=0
fi

# ---------------------------------------------------------------- cleanup
work=$(mktemp -d /tmp/psycopg-suite.XXXXXX)
data=$work/data
gw_pids=()
hold_pid=
test_pid=
pg_started=0
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
  local status=$?
  set +e
  [ -n "$hold_pid" ] && kill "$hold_pid" 2>/dev/null
  if [ -n "$test_pid" ]; then
    kill -TERM "$test_pid" 2>/dev/null
    wait "$test_pid" 2>/dev/null
  fi
  for pid in "${gw_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${gw_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$pg_started" = 1 ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
      as_pg "$PG_BIN/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1
  fi
  [ -f "$work/postgres.log" ] && mkdir -p "$out" && cp "$work/postgres.log" "$out/postgres.log" 2>/dev/null
  for m in transaction session; do
    [ -f "$work/gw-$m/gateway.log" ] && cp "$work/gw-$m/gateway.log" "$out/pgwarden-$m.log" 2>/dev/null
  done
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- postgres
if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$work"; fi
as_pg "$PG_BIN/initdb" -D "$data" -U postgres -A trust --no-sync -E UTF8 --locale=C >"$work/initdb.log" 2>&1 ||
  { cat "$work/initdb.log" >&2; die "initdb failed"; }
pg_port=$(free_port)
as_pg tee -a "$data/postgresql.conf" >/dev/null <<EOF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
max_prepared_transactions = 20
shared_buffers = 64MB
log_min_messages = warning
password_encryption = 'scram-sha-256'
EOF
as_pg tee "$data/pg_hba.conf" >/dev/null <<EOF
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
as_pg touch "$work/postgres.log"
pg_started=1
as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$work/postgres.log" -w -t 60 start >/dev/null ||
  { cat "$work/postgres.log" >&2; die "pg_ctl start failed"; }
say "PostgreSQL on 127.0.0.1:$pg_port ($(as_pg "$PG_BIN/postgres" --version))"

sql() { # sql DB STATEMENTS: as the superuser
  "$psql" -X -q -v ON_ERROR_STOP=1 -At -h 127.0.0.1 -p "$pg_port" -U postgres -d "$1" -c "$2" >/dev/null
}
sql postgres "
  CREATE ROLE psy LOGIN PASSWORD 'psy-pw';
  CREATE ROLE pgwarden_svc LOGIN NOINHERIT PASSWORD 'svc-pw';
  GRANT psy TO pgwarden_svc;"
for db in psy_direct psy_tx psy_session; do
  sql postgres "CREATE DATABASE $db OWNER psy"
  # hstore is trusted, but the tests create it through their svcconn: create
  # it here, so the hstore tests do not depend on who may create extensions.
  sql "$db" "CREATE EXTENSION hstore; GRANT CREATE ON SCHEMA public TO psy"
done

# ---------------------------------------------------------------- pgwarden
declare -A port_of
start_gateway() { # start_gateway MODE DB
  local mode=$1 db=$2 dir=$work/gw-$1 port
  port=$(free_port)
  mkdir -p "$dir/policies"
  cat >"$dir/policies/10-psycopg.toml" <<'EOF'
[[map]]
clients = ["psy"]
role = "{user}"
EOF
  cat >"$dir/pgwarden.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
shutdown_timeout_ms = 2000

[backend]
host = "127.0.0.1"
port = $pg_port
service_user = "pgwarden_svc"
service_password = "svc-pw"

[pool]
mode = "$mode"
size = $pool_size

[identity]
policy_dir = "policies"
allow_dynamic_sql = $dynamic_sql

[audit]
enabled = false
store = "audit"
EOF
  NO_COLOR=1 PGWARDEN_LOG=${PGWARDEN_LOG:-info} "$bin" serve -c "$dir/pgwarden.toml" >"$dir/gateway.log" 2>&1 &
  gw_pids+=($!)
  port_of[$mode]=$port
  local i
  for i in $(seq 100); do
    if PGPASSWORD=psy-pw PGCONNECT_TIMEOUT=5 "$psql" -X -q -At -h 127.0.0.1 -p "$port" -U psy \
      -d "$db" -c 'select 1' >/dev/null 2>&1; then
      say "pgwarden ($mode mode) on 127.0.0.1:$port"
      return 0
    fi
    kill -0 "${gw_pids[-1]}" 2>/dev/null || break
    sleep 0.2
  done
  cat "$dir/gateway.log" >&2
  die "pgwarden ($mode mode) did not accept a login"
}

# ---------------------------------------------------------------- runs
mkdir -p "$out"
echo "$psy_version" >"$out/versions.txt"
as_pg "$PG_BIN/postgres" --version >>"$out/versions.txt"
"$bin" --version >>"$out/versions.txt" 2>&1 || true

run_pytest() { # run_pytest RUN SUITE PORT DB PATHS...
  local run=$1 suite=$2 port=$3 db=$4
  shift 4
  local dsn="host=127.0.0.1 port=$port user=psy password=psy-pw dbname=$db connect_timeout=10"
  local name=$run-$suite started rc
  rm -f "$out/$name.xml" "$out/$name.log"
  say "$name: pytest ${*} (log: $out/$name.log)"
  started=$(date +%s)
  set +e
  # cache_dir instead of -p no:cacheprovider: psycopg's conftest reads and
  # writes session.config.cache (its segfault detector).
  # xunit1 puts each test's file in the XML, so the report can print
  # pytest node ids.
  # shellcheck disable=SC2086
  (cd "$checkout" && exec timeout --kill-after=30 $((3 * 3600)) \
    "$venv/bin/python" -m pytest -p no:randomly -o cache_dir="$work/pytest-cache-$name" \
    -o junit_family=xunit1 --junitxml="$out/$name.xml" \
    --timeout="$timeout" -m "$markers" -q -rfE --tb=short --no-header \
    "${deselect[@]}" --test-dsn "$dsn" ${PSYCOPG_SUITE_PYTEST_ARGS:-} "$@") >"$out/$name.log" 2>&1 &
  test_pid=$!
  wait "$test_pid"
  rc=$?
  test_pid=
  set -e
  echo "$(($(date +%s) - started))" >"$out/$name.seconds"
  local summary
  summary=$(grep -E ' in [0-9.]+s( \([0-9:]+\))?$' "$out/$name.log" | tail -n 1 || true)
  say "$name: exit $rc, ${summary:-no summary line}, $(cat "$out/$name.seconds") s"
}

for r in $runs; do
  case $r in
    direct) port=$pg_port db=psy_direct ;;
    tx) db=psy_tx; [ -n "${port_of[transaction]:-}" ] || start_gateway transaction "$db"; port=${port_of[transaction]} ;;
    session) db=psy_session; [ -n "${port_of[session]:-}" ] || start_gateway session "$db"; port=${port_of[session]} ;;
  esac
  run_pytest "$r" main "$port" "$db" "${tests[@]}"
  if [ "$with_pool" = 1 ] && [ -d "$checkout/tests/pool" ]; then
    run_pytest "$r" pool "$port" "$db" tests/pool
  fi
done

if [ -n "$runs" ]; then
  "$venv/bin/python" "$here/psycopg-suite-report.py" "$out" "$checkout" | tee "$out/report.md"
fi

if [ "${PSYCOPG_SUITE_HOLD:-0}" = 1 ]; then
  [ -n "${port_of[transaction]:-}" ] || start_gateway transaction psy_tx
  [ -n "${port_of[session]:-}" ] || start_gateway session psy_session
  say "holding; stop with kill -TERM $$. DSNs (PSYCOPG_IMPL=python, venv $venv):"
  echo "direct:      host=127.0.0.1 port=$pg_port user=psy password=psy-pw dbname=psy_direct"
  echo "transaction: host=127.0.0.1 port=${port_of[transaction]} user=psy password=psy-pw dbname=psy_tx"
  echo "session:     host=127.0.0.1 port=${port_of[session]} user=psy password=psy-pw dbname=psy_session"
  echo "superuser:   host=127.0.0.1 port=$pg_port user=postgres dbname=postgres"
  if [ "$PSYCOPG_SUITE_NETNS" = 1 ]; then
    say "these listen in this script's network namespace: nsenter --net=/proc/$$/ns/net COMMAND"
  fi
  sleep infinity &
  hold_pid=$!
  wait "$hold_pid" || true
fi
