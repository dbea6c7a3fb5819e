#!/usr/bin/env bash
# Installs the client drivers that tests/it/drivers.rs runs through the
# gateway, from the registries' ordinary clients only:
#   - psycopg 3 (binary) and asyncpg from PyPI, into the venv
#     target/drivers-venv (or $PGWARDEN_DRIVERS_VENV), versions pinned in
#     tests/drivers/python/requirements.txt;
#   - node-postgres (`pg`) from npm, `npm ci` from the committed
#     tests/drivers/node/package-lock.json;
#   - Debian's libpostgresql-jdbc-java (/usr/share/java/postgresql.jar),
#     and a JDK / Python venv support / Node if the machine lacks them.
# Idempotent: each step is skipped when what it installs is already there
# and matches the pinned versions. Called by scripts/setup.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
drivers=$root/tests/drivers
venv=${PGWARDEN_DRIVERS_VENV:-$root/target/drivers-venv}

say() { echo "drivers: $*" >&2; }

# Debian packages first: they provide the runtimes the other steps use.
need=()
[ -f /usr/share/java/postgresql.jar ] || need+=(libpostgresql-jdbc-java)
command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ "${#need[@]}" -gt 0 ]; then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Python: a venv whose stamp is the requirements file it was built from.
req=$drivers/python/requirements.txt
stamp=$venv/.pgwarden-requirements
if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp" &&
  "$venv/bin/python" -c 'import psycopg, asyncpg' >/dev/null 2>&1; then
  :
else
  say "pip install -r tests/drivers/python/requirements.txt into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi

# Node: npm ci from the lock file; the stamp is the lock file it installed.
lock=$drivers/node/package-lock.json
nstamp=$drivers/node/node_modules/.pgwarden-lock
if [ -d "$drivers/node/node_modules/pg" ] && cmp -s "$lock" "$nstamp"; then
  :
else
  say "npm ci in tests/drivers/node"
  (cd "$drivers/node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$lock" "$nstamp"
fi
