"""psycopg 3 through pgwarden in transaction pooling.

Every query is prepared server-side (prepare_threshold=0), so each one is a
named statement that must survive the client moving between server
connections. Covers: identity, prepared-statement eviction (psycopg's own
DEALLOCATE), server-side cursors inside a transaction, COPY in and out (text
and binary), pipeline mode, an error in a transaction then rollback,
savepoints, cancel, and several threads with their own connections (more
than the gateway's pool) each checking its identity and its own TimeZone
many times. Exits non-zero on the first failure.

PGWARDEN_PSYCOPG_DEALLOCATE_ALL=1 adds the paths after which psycopg sends
DEALLOCATE ALL inside a transaction or through the extended protocol: a
failed savepoint, DROP in a transaction, an error in pipeline mode.
"""

import os
import threading
import time

import psycopg
from psycopg import errors

from common import (
    IDENTITY_SQL,
    check,
    expect_eq,
    expected_identity,
    gateway,
    identities,
    run_main,
    run_number,
    step,
)

# This run's own table and id range in the shared items table.
TABLE = f"drv_psycopg_{run_number()}"
ITEMS_BASE = 10_000_000 + run_number() * 10_000
THREADS = 6
ROUNDS = 30


def connect(ident, app, **kw):
    host, port, db = gateway()
    return psycopg.connect(
        host=host,
        port=port,
        dbname=db,
        user=ident.user,
        password=ident.password,
        application_name=app,
        prepare_threshold=0,
        autocommit=kw.pop("autocommit", True),
        connect_timeout=10,
        **kw,
    )


def check_identity(conn, ident, app):
    got = conn.execute(IDENTITY_SQL).fetchone()
    expect_eq(got, expected_identity(ident, app), "identity")


def prepared_statements(conn):
    # The statement is prepared before it runs, so it sees itself.
    marker = "psycopg-prepared-marker"
    for i in range(20):
        n = conn.execute(
            "SELECT count(*) FROM pg_prepared_statements"
            f" WHERE statement LIKE '%%{marker}%%' AND %s::int >= 0",
            (i,),
        ).fetchone()[0]
        check(n >= 1, f"query {i} is not a server-side prepared statement")
    # A small client-side cache: psycopg DEALLOCATEs what it evicts, and the
    # evicted statements are prepared again when they come back.
    conn.prepared_max = 4
    for _ in range(3):
        for k in range(10):
            got = conn.execute(f"SELECT %s::int + {k}", (k,)).fetchone()[0]
            expect_eq(got, 2 * k, f"evicted statement {k}")
    step("prepare_threshold=0: every query prepared; eviction and DEALLOCATE")


def setup_table(conn):
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, owner text, payload bytea)")


def server_cursor(conn):
    with conn.transaction():
        with conn.cursor(name="drv_psycopg_cur") as cur:
            cur.itersize = 7
            cur.execute(
                "SELECT g, md5(g::text) FROM generate_series(1, %s) g ORDER BY g",
                (250,),
            )
            first = cur.fetchmany(10)
            expect_eq([r[0] for r in first], list(range(1, 11)), "fetchmany")
            rest = list(cur)
            expect_eq(len(rest), 240, "rows after fetchmany")
            expect_eq(rest[-1][0], 250, "last row")
        # A second cursor in the same transaction, scrollable.
        with conn.cursor(name="drv_psycopg_scroll", scrollable=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 100) g")
            cur.scroll(90, mode="absolute")
            expect_eq(cur.fetchone(), (91,), "scroll absolute")
            cur.scroll(-50)
            expect_eq(cur.fetchone(), (42,), "scroll relative")
    step("server-side cursors inside a transaction")


def copy(conn):
    rows = [(i, f"copy-{i}", bytes([i % 256, 0, 255]) * (i % 5)) for i in range(1, 1001)]
    cur = conn.cursor()
    with cur.copy(f"COPY {TABLE} (id, owner, payload) FROM STDIN") as cp:
        for r in rows[:500]:
            cp.write_row(r)
    with cur.copy(f"COPY {TABLE} (id, owner, payload) FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(["int4", "text", "bytea"])
        for r in rows[500:]:
            cp.write_row(r)
    expect_eq(
        conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0], 1000, "rows copied in"
    )
    got = []
    with cur.copy(f"COPY (SELECT id, owner, payload FROM {TABLE} ORDER BY id) TO STDOUT (FORMAT BINARY)") as cp:
        cp.set_types(["int4", "text", "bytea"])
        for r in cp.rows():
            got.append((r[0], r[1], bytes(r[2])))
    expect_eq(got, rows, "binary COPY out")
    with cur.copy(f"COPY (SELECT id, owner FROM {TABLE} WHERE id <= 3 ORDER BY id) TO STDOUT") as cp:
        text = b"".join(bytes(block) for block in cp)
    expect_eq(text, b"1\tcopy-1\n2\tcopy-2\n3\tcopy-3\n", "text COPY out")
    # A failed COPY (bad data) leaves the connection usable.
    try:
        with cur.copy(f"COPY {TABLE} (id, owner) FROM STDIN") as cp:
            cp.write(b"not-a-number\tx\n")
        raise AssertionError("bad COPY data was accepted")
    except errors.InvalidTextRepresentation:
        pass
    expect_eq(conn.execute("SELECT 1").fetchone(), (1,), "after failed COPY")
    step("COPY in (text, binary), COPY out (binary, text), failed COPY")


def pipeline(conn):
    cur = conn.cursor()
    with conn.pipeline():
        cur.executemany(
            f"INSERT INTO {TABLE} (id, owner) VALUES (%s, %s)",
            [(2000 + i, f"pipe-{i}") for i in range(100)],
        )
        curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(20)]
        with conn.transaction():
            conn.execute(f"UPDATE {TABLE} SET owner = 'piped' WHERE id >= 2000 AND id < 2050")
            conn.execute(f"DELETE FROM {TABLE} WHERE id >= 2090 AND id < 2100")
    expect_eq([c.fetchone()[0] for c in curs], [2 * i for i in range(20)], "pipelined results")
    counts = conn.execute(
        f"SELECT count(*) FILTER (WHERE owner = 'piped'), count(*) FROM {TABLE}"
        " WHERE id >= 2000 AND id < 3000"
    ).fetchone()
    expect_eq(counts, (50, 90), "pipeline writes")
    step("pipeline mode: executemany, results, transaction")


def still_prepared(conn, ident, what):
    """Statements prepared before `what` still run, on this connection and
    on a new one (the same server connection when the pool has one)."""
    for _ in range(3):
        check_identity(conn, ident, "drv-psycopg")
        expect_eq(conn.execute("SELECT 1").fetchone(), (1,), f"SELECT 1 after {what}")
        with connect(ident, "drv-psycopg-after") as other:
            check_identity(other, ident, "drv-psycopg-after")
            expect_eq(other.execute("SELECT 1").fetchone(), (1,), f"another client after {what}")


def deallocate_all_paths(conn, ident):
    """The paths after which psycopg, holding prepared statements, sends
    DEALLOCATE ALL inside a transaction (after a command tagged ROLLBACK,
    DROP or ALTER: here ROLLBACK TO SAVEPOINT and DROP TABLE) or through the
    extended protocol (after an error in pipeline mode)."""
    still_prepared(conn, ident, "nothing")
    # A savepoint whose block fails: ROLLBACK TO SAVEPOINT, then DEALLOCATE
    # ALL inside the outer transaction.
    with conn.transaction():
        conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (4101, 'kept')")
        try:
            with conn.transaction():
                conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (4101, 'dup')")
        except errors.UniqueViolation:
            pass
        conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (4102, 'kept')")
    expect_eq(
        conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id IN (4101, 4102)").fetchone()[0],
        2,
        "savepoint",
    )
    still_prepared(conn, ident, "a failed savepoint")
    # DROP inside a transaction.
    with conn.transaction():
        conn.execute(f"CREATE TABLE {TABLE}_x (x int)")
        conn.execute(f"DROP TABLE {TABLE}_x")
    still_prepared(conn, ident, "DROP TABLE in a transaction")
    # An error in a pipeline: ROLLBACK and DEALLOCATE ALL via Parse/Bind/Execute.
    try:
        with conn.pipeline():
            with conn.transaction():
                conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (3000, 'doomed')")
                conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (2000, 'dup')")
                conn.execute("SELECT 1")
        raise AssertionError("duplicate key in a pipeline did not raise")
    except errors.UniqueViolation:
        pass
    expect_eq(
        conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id = 3000").fetchone()[0],
        0,
        "rolled-back pipeline insert",
    )
    still_prepared(conn, ident, "an error in pipeline mode")
    step("DEALLOCATE ALL in a transaction / in pipeline mode; prepared statements still run")


def errors_and_rollback(conn, ident):
    # Autocommit connection, explicit transaction block.
    try:
        with conn.transaction():
            conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (4000, 'lost')")
            conn.execute("SELECT 1 / 0")
        raise AssertionError("division by zero did not raise")
    except errors.DivisionByZero:
        pass
    expect_eq(conn.info.transaction_status, psycopg.pq.TransactionStatus.IDLE, "status")
    expect_eq(
        conn.execute(f"SELECT count(*) FROM {TABLE} WHERE id = 4000").fetchone()[0], 0, "rollback"
    )
    # A savepoint that commits. (One whose block fails makes psycopg send
    # DEALLOCATE ALL inside the transaction: see deallocate_all_paths.)
    with conn.transaction():
        conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (4001, 'kept')")
        with conn.transaction():
            conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (4002, 'kept')")
    expect_eq(
        conn.execute(f"SELECT count(*) FROM {TABLE} WHERE owner = 'kept'").fetchone()[0],
        2,
        "savepoint",
    )
    # psycopg's default (non-autocommit) mode: an implicit transaction,
    # an error, then rollback().
    with connect(ident, "drv-psycopg-tx", autocommit=False) as tx:
        tx.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (4003, 'lost')")
        try:
            tx.execute(f"SELECT * FROM {TABLE} WHERE id = 'x'")
            raise AssertionError("bad input did not raise")
        except errors.InvalidTextRepresentation:
            pass
        expect_eq(tx.info.transaction_status, psycopg.pq.TransactionStatus.INERROR, "in error")
        try:
            tx.execute("SELECT 1")
            raise AssertionError("statement in a failed transaction ran")
        except errors.InFailedSqlTransaction:
            pass
        tx.rollback()
        tx.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (4004, 'committed')")
        tx.commit()
        check_identity(tx, ident, "drv-psycopg-tx")
        tx.commit()
    got = conn.execute(f"SELECT id FROM {TABLE} WHERE id IN (4003, 4004)").fetchall()
    expect_eq(got, [(4004,)], "rollback then commit")
    step("errors in transactions, rollback, savepoint")


def cancel(ident):
    # A cancel request carries the gateway's key; the gateway forwards it to
    # whichever server connection runs the statement.
    app = "drv-psycopg-cancel"
    with connect(ident, app) as conn:
        outcome = []

        def sleeper():
            started = time.monotonic()
            try:
                conn.execute("SELECT pg_sleep(30)")
                outcome.append("pg_sleep was not cancelled")
            except errors.QueryCanceled:
                outcome.append(time.monotonic() - started)
            except Exception as e:  # noqa: BLE001 - reported below
                outcome.append(f"{type(e).__name__}: {e}")

        t = threading.Thread(target=sleeper)
        t.start()
        # A cancel that arrives before the statement runs (it may wait for
        # a server connection) is dropped: repeat until it takes effect.
        deadline = time.monotonic() + 20
        while t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.3)
            conn.cancel_safe(timeout=10)
            t.join(timeout=0.5)
        check(not t.is_alive(), "cancelled statement still running after 20 s")
        check(isinstance(outcome[0], float), str(outcome[0]))
        check(outcome[0] < 10, f"cancel took {outcome[0]:.1f} s")
        check_identity(conn, ident, app)
    step("cancel_safe() stops pg_sleep; the connection stays usable")


def worker(n, ident, failures):
    app = f"drv-psycopg-{n}"
    tz = f"Etc/GMT-{n + 1}"
    base = ITEMS_BASE + n * 1000
    try:
        with connect(ident, app) as conn:
            conn.execute(f"SET TimeZone = '{tz}'")
            for i in range(ROUNDS):
                check_identity(conn, ident, app)
                expect_eq(conn.execute("SHOW TimeZone").fetchone()[0], tz, "TimeZone")
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO items (id, owner, payload) VALUES (%s, %s, %s)",
                        (base + i, ident.user, bytes([n, i])),
                    )
                    got = conn.execute(
                        "SELECT owner, payload, current_setting('app.client_user')"
                        " FROM items WHERE id = %s",
                        (base + i,),
                    ).fetchone()
                    expect_eq(got, (ident.user, bytes([n, i]), ident.user), "own row")
            n_rows = conn.execute(
                "DELETE FROM items WHERE id >= %s AND id < %s AND owner = %s",
                (base, base + 1000, ident.user),
            ).rowcount
            expect_eq(n_rows, ROUNDS, "rows deleted")
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        failures.append(f"thread {n} ({ident}): {type(e).__name__}: {e}")


def concurrent():
    ids = identities()
    failures = []
    threads = [
        threading.Thread(target=worker, args=(n, ids[n % len(ids)], failures))
        for n in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        check(not t.is_alive(), "a thread did not finish within 60 s")
    check(not failures, "; ".join(failures))
    step(f"{THREADS} threads x {ROUNDS} rounds, identities {ids}")


def main():
    ident = identities()[0]
    with connect(ident, "drv-psycopg") as conn:
        check_identity(conn, ident, "drv-psycopg")
        step("identity")
        prepared_statements(conn)
        setup_table(conn)
        server_cursor(conn)
        copy(conn)
        pipeline(conn)
        errors_and_rollback(conn, ident)
        if os.environ.get("PGWARDEN_PSYCOPG_DEALLOCATE_ALL") == "1":
            deallocate_all_paths(conn, ident)
        cancel(ident)
        concurrent()
        check_identity(conn, ident, "drv-psycopg")
        conn.execute(f"DROP TABLE {TABLE}")


if __name__ == "__main__":
    run_main(main)
