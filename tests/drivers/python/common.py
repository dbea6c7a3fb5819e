"""Shared by the Python driver scripts: connection parameters from the
environment, identities, and a failure that names the step that broke.

Environment (set by tests/it/drivers.rs):
  PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE  the gateway and the main client
  PGWARDEN_EXPECT_ROLE                        the role PGUSER is mapped to
  PGWARDEN_OTHER_USER / _PASSWORD / _ROLE     optional second client, mixed
                                              into the concurrent phase
  PGWARDEN_RUN                                a number unique among the runs
                                              sharing the cluster: it names
                                              this run's table and id range
"""

import os
import sys
import traceback


class Identity:
    def __init__(self, user, password, role):
        self.user = user
        self.password = password
        self.role = role

    def __repr__(self):
        return f"{self.user}->{self.role}"


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"FAIL: environment variable {name} is not set")
    return value


def gateway():
    """(host, port, database) of the gateway under test."""
    return env("PGHOST"), int(env("PGPORT")), env("PGDATABASE")


def run_number():
    """This run's number (PGWARDEN_RUN, default 0)."""
    return int(os.environ.get("PGWARDEN_RUN", "0"))


def identities():
    """The main identity, then the optional second one."""
    ids = [Identity(env("PGUSER"), env("PGPASSWORD"), env("PGWARDEN_EXPECT_ROLE"))]
    other = os.environ.get("PGWARDEN_OTHER_USER")
    if other:
        ids.append(
            Identity(
                other,
                env("PGWARDEN_OTHER_PASSWORD"),
                env("PGWARDEN_OTHER_ROLE"),
            )
        )
    return ids


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def expect_eq(got, want, what):
    if got != want:
        raise Failure(f"{what}: got {got!r}, want {want!r}")


# Who the server connection says we are, and the application_name
# PostgreSQL records for it (the gateway tags it with the client name).
IDENTITY_SQL = (
    "SELECT current_user::text, current_setting('app.client_user'),"
    " (SELECT application_name FROM pg_stat_activity"
    "  WHERE pid = pg_backend_pid())"
)


def expected_identity(ident, app):
    return (ident.role, ident.user, f"{app} [{ident.user}]")


def step(name):
    print(f"ok: {name}", flush=True)


def run_main(main):
    """Runs main(); any exception becomes exit status 1 with its trace."""
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report everything, then fail
        traceback.print_exc()
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("PASS", flush=True)
