"""A mixed psycopg 3 workload whose audit trail tests/it/audit_truth.rs
reconciles with the table it writes: every row must be attributable to
exactly one committed statement of the client that wrote it, and no
statement recorded as committed may be missing from the table.

Each client (PGUSER, then PGWARDEN_OTHER_USER) inserts rows with its own id
range into PGWARDEN_RECON_TABLE (id int PRIMARY KEY, who text): autocommit,
committed and rolled-back transactions, a savepoint rolled back, a pipeline
whose middle statement fails, a multi-statement query, executemany with
parameters (prepared and not), a duplicate key, and commit and rollback
outside autocommit.
"""

import psycopg
from psycopg import errors

from common import env, gateway, identities, run_main, step


def connect(ident, **kw):
    host, port, db = gateway()
    return psycopg.connect(
        host=host,
        port=port,
        dbname=db,
        user=ident.user,
        password=ident.password,
        application_name="reconcile",
        autocommit=True,
        connect_timeout=10,
        **kw,
    )


def workload(ident, base, table):
    who = ident.user

    def insert(conn, n):
        conn.execute(f"INSERT INTO {table} (id, who) VALUES ({base + n}, '{who}')")

    with connect(ident, prepare_threshold=None) as conn:
        insert(conn, 1)
        with conn.transaction():
            insert(conn, 2)
            insert(conn, 3)
        try:
            with conn.transaction():
                insert(conn, 4)
                raise psycopg.Rollback()
        except psycopg.Rollback:
            pass
        with conn.transaction():
            insert(conn, 5)
            try:
                with conn.transaction():
                    insert(conn, 6)
                    conn.execute("SELECT 1/0")
            except errors.DivisionByZero:
                pass
            insert(conn, 7)
        try:
            with conn.pipeline():
                insert(conn, 8)
                conn.execute("SELECT 1/0")
                insert(conn, 9)
        except errors.DivisionByZero:
            pass
        # No parameters: psycopg sends it with the simple protocol.
        conn.execute(
            f"INSERT INTO {table} (id, who) VALUES ({base + 10}, '{who}');"
            f" INSERT INTO {table} (id, who) VALUES ({base + 11}, '{who}')"
        )
        # Parameters: the rows are told apart by the logged parameters.
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} (id, who) VALUES (%s, %s)",
                [(base + 12, who), (base + 13, who)],
            )
    with connect(ident, prepare_threshold=0) as conn:
        with conn.transaction():
            for n in (14, 15):
                conn.execute(f"INSERT INTO {table} (id, who) VALUES (%s, %s)", (base + n, who))
        try:
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} (id, who) VALUES (%s, %s)", (base + 16, who))
                conn.execute(f"INSERT INTO {table} (id, who) VALUES (%s, %s)", (base + 16, who))
        except errors.UniqueViolation:
            pass
        conn.autocommit = False
        conn.execute(f"INSERT INTO {table} (id, who) VALUES (%s, %s)", (base + 17, who))
        conn.rollback()
        conn.execute(f"INSERT INTO {table} (id, who) VALUES (%s, %s)", (base + 18, who))
        conn.commit()
    step(f"{who}: workload")


def main():
    table = env("PGWARDEN_RECON_TABLE")
    for k, ident in enumerate(identities()):
        workload(ident, 1000 * (k + 1), table)


run_main(main)
