#!/usr/bin/env bash
# Installs what building and testing pgwarden needs on a fresh Debian 12
# machine with a Rust toolchain: PostgreSQL 15 (server binaries for the
# throwaway test clusters, psql and pgbench as real clients), rsyslog with
# its TLS and RELP inputs (the syslog server the audit shipping tests start
# themselves), HAProxy (the load balancer of the several-gateways test),
# cargo-deb (the package test), and the client drivers of the
# driver-matrix tests (tests/drivers/install.sh).
# Idempotent: does nothing where everything is present.
set -euo pipefail
need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client-15)
[ -x /usr/lib/postgresql/15/bin/pgbench ] || need+=(postgresql-contrib)
# A real syslog server for the audit shipping tests (tests/it/shipping.rs).
command -v rsyslogd >/dev/null 2>&1 || need+=(rsyslog)
dpkg -s rsyslog-openssl >/dev/null 2>&1 || need+=(rsyslog-openssl)  # its TLS listener
dpkg -s rsyslog-relp >/dev/null 2>&1 || need+=(rsyslog-relp)        # its RELP listener (imrelp)
# A real load balancer in front of several gateways (tests/it/haproxy.rs).
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# PostgreSQL refuses to run as root; the tests run it as this OS user then.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi
# cargo-deb builds the Debian package (tests/it/packaging.rs); pinned, since
# it is a build tool the tests drive.
if ! cargo deb --version 2>/dev/null | grep -q '^cargo-deb 3\.8\.0$'; then
  cargo install cargo-deb --version 3.8.0 --locked
fi
# The client drivers that the driver-matrix tests (tests/it/drivers.rs) run
# through the gateway: psycopg 3, asyncpg, node-postgres, PostgreSQL JDBC.
bash "$(dirname "$0")/../tests/drivers/install.sh"
