"""asyncpg through pgwarden in transaction pooling.

asyncpg runs every query as a named prepared statement (its statement
cache), including its type-introspection queries, so everything here crosses
server connections as named statements. Covers: identity, fetch /
fetchrow / fetchval, executemany, prepare() reuse, type introspection (an
enum, a jsonb codec), a transaction with a savepoint, errors,
copy_records_to_table / copy_to_table / copy_from_query, cursors (portals
with row limits), asyncio.gather over more connections than the gateway's
pool mixing two identities, and a Pool. Exits non-zero on the first failure.

PGWARDEN_ASYNCPG_POOL_RESET=default gives the Pool asyncpg's own reset on
release (it ends with RESET ALL, which pgwarden refuses).
"""

import asyncio
import io
import json
import os

import asyncpg

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
TABLE = f"drv_asyncpg_{run_number()}"
MOOD = f"drv_asyncpg_mood_{run_number()}"
ITEMS_BASE = 11_000_000 + run_number() * 10_000
CONNECTIONS = 6
ROUNDS = 30


async def connect(ident, app):
    host, port, db = gateway()
    return await asyncpg.connect(
        host=host,
        port=port,
        database=db,
        user=ident.user,
        password=ident.password,
        server_settings={"application_name": app},
        timeout=10,
    )


async def check_identity(conn, ident, app):
    got = tuple(await conn.fetchrow(IDENTITY_SQL))
    expect_eq(got, expected_identity(ident, app), "identity")


async def basics(conn):
    rows = await conn.fetch("SELECT g, g * $1::int AS twice FROM generate_series(1, 50) g", 2)
    expect_eq([(r["g"], r["twice"]) for r in rows], [(g, 2 * g) for g in range(1, 51)], "fetch")
    row = await conn.fetchrow("SELECT $1::text || '!' AS s, $2::bytea AS b", "hi", b"\x00\xff")
    expect_eq((row["s"], row["b"]), ("hi!", b"\x00\xff"), "fetchrow")
    expect_eq(await conn.fetchval("SELECT $1::int8 + 1", 41), 42, "fetchval")
    # The cached statements are server-side named statements: this one sees
    # itself in pg_prepared_statements.
    n = await conn.fetchval(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%asyncpg-marker%'"
    )
    check(n >= 1, "asyncpg's statement is not server-side prepared")
    step("fetch, fetchrow, fetchval (named statements)")


async def prepared(conn, ident):
    stmt = await conn.prepare("SELECT $1::int * 3, current_setting('app.client_user')")
    for i in range(100):
        expect_eq(tuple(await stmt.fetchrow(i)), (3 * i, ident.user), "prepared")
    expect_eq(await stmt.fetchval(7), 21, "fetchval on a prepared statement")
    step("prepare() reused 100 times")


async def introspection(conn):
    await conn.execute(f"DROP TYPE IF EXISTS {MOOD}")
    await conn.execute(f"CREATE TYPE {MOOD} AS ENUM ('sad', 'happy')")
    got = await conn.fetchval(f"SELECT $1::{MOOD}", "happy")
    expect_eq(got, "happy", "enum through introspection")
    got = await conn.fetch(f"SELECT unnest(enum_range(NULL::{MOOD})) AS m")
    expect_eq([r["m"] for r in got], ["sad", "happy"], "enum array")
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    got = await conn.fetchval("SELECT $1::jsonb -> 'a'", {"a": [1, 2]})
    expect_eq(got, [1, 2], "jsonb codec")
    await conn.execute(f"DROP TYPE {MOOD}")
    step("type introspection (enum) and a custom jsonb codec")


async def setup_table(conn):
    await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, owner text, payload bytea)")


async def executemany_and_transactions(conn):
    await conn.executemany(
        f"INSERT INTO {TABLE} (id, owner, payload) VALUES ($1, $2, $3)",
        [(i, f"many-{i}", bytes([i % 256])) for i in range(1, 201)],
    )
    expect_eq(await conn.fetchval(f"SELECT count(*) FROM {TABLE}"), 200, "executemany")
    # executemany with a failing row: nothing of it is kept.
    try:
        await conn.executemany(
            f"INSERT INTO {TABLE} (id, owner) VALUES ($1, $2)",
            [(300, "a"), (301, "b"), (1, "dup")],
        )
        raise AssertionError("duplicate key in executemany did not raise")
    except asyncpg.UniqueViolationError:
        pass
    expect_eq(await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id >= 300"), 0, "atomic")
    # A transaction with a savepoint that fails and one that commits.
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (400, 'outer')")
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (401, 'inner')")
                await conn.execute("SELECT 1 / 0")
        except asyncpg.DivisionByZeroError:
            pass
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (402, 'inner-ok')")
        expect_eq(conn.is_in_transaction(), True, "still in the outer transaction")
    got = await conn.fetch(f"SELECT id FROM {TABLE} WHERE id >= 400 ORDER BY id")
    expect_eq([r["id"] for r in got], [400, 402], "savepoints")
    # An error in a transaction rolls the whole of it back.
    try:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (500, 'lost')")
            await conn.execute(f"INSERT INTO {TABLE} (id, owner) VALUES (500, 'dup')")
        raise AssertionError("duplicate key did not raise")
    except asyncpg.UniqueViolationError:
        pass
    expect_eq(await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id = 500"), 0, "rollback")
    expect_eq(conn.is_in_transaction(), False, "idle after rollback")
    step("executemany, transaction with savepoints, errors and rollback")


async def copy(conn):
    records = [(1000 + i, f"copy-{i}", bytes([i % 256, 0]) * (i % 4)) for i in range(1000)]
    res = await conn.copy_records_to_table(
        TABLE, records=records, columns=["id", "owner", "payload"]
    )
    expect_eq(res, "COPY 1000", "copy_records_to_table")
    csv = io.BytesIO(b"".join(f"{5000 + i},csv-{i}\n".encode() for i in range(50)))
    res = await conn.copy_to_table(TABLE, source=csv, columns=["id", "owner"], format="csv")
    expect_eq(res, "COPY 50", "copy_to_table")
    out = io.BytesIO()
    res = await conn.copy_from_query(
        f"SELECT id, owner FROM {TABLE} WHERE id >= $1 AND id < $2 ORDER BY id",
        1000,
        1003,
        output=out,
        format="csv",
    )
    expect_eq(res, "COPY 3", "copy_from_query")
    expect_eq(out.getvalue(), b"1000,copy-0\n1001,copy-1\n1002,copy-2\n", "copied out")
    out = io.BytesIO()
    await conn.copy_from_table(TABLE, output=out, format="binary")
    check(len(out.getvalue()) > 20_000, "binary copy_from_table is too short")
    got = await conn.fetch(
        f"SELECT id, owner, payload FROM {TABLE} WHERE id >= 1000 AND id < 2000 ORDER BY id"
    )
    expect_eq([tuple(r) for r in got], records, "records copied in")
    step("copy_records_to_table, copy_to_table, copy_from_query, copy_from_table")


async def cursors(conn):
    # Cursors need a transaction; asyncpg runs them as a named portal with a
    # row limit per Execute (PortalSuspended in between).
    async with conn.transaction():
        got = [r[0] async for r in conn.cursor("SELECT g FROM generate_series(1, $1) g", 500, prefetch=37)]
        expect_eq(got, list(range(1, 501)), "iterated cursor")
        cur = await conn.cursor("SELECT g FROM generate_series(1, 100) g ORDER BY g")
        expect_eq([r[0] for r in await cur.fetch(5)], [1, 2, 3, 4, 5], "cursor fetch")
        expect_eq(await cur.forward(10), 10, "cursor forward")
        expect_eq(tuple(await cur.fetchrow()), (16,), "cursor fetchrow")
    step("cursors inside a transaction (portals with row limits)")


async def reset_without_reset_all(conn):
    """asyncpg's default pool reset minus `RESET ALL`, which pgwarden
    refuses (it would drop the client-user setting); the gateway resets a
    server connection before another client gets it anyway."""
    query = "\n".join(
        line for line in conn.get_reset_query().splitlines() if line.strip() != "RESET ALL;"
    )
    if query.strip():
        await conn.execute(query)


async def pool(ident):
    """An asyncpg Pool larger than the gateway's. PGWARDEN_ASYNCPG_POOL_RESET
    = "default" keeps asyncpg's own reset on release (RESET ALL included)."""
    host, port, db = gateway()
    default_reset = os.environ.get("PGWARDEN_ASYNCPG_POOL_RESET") == "default"
    app = "drv-asyncpg-pool"
    async with asyncpg.create_pool(
        host=host,
        port=port,
        database=db,
        user=ident.user,
        password=ident.password,
        server_settings={"application_name": app},
        min_size=1,
        max_size=5,
        reset=None if default_reset else reset_without_reset_all,
    ) as p:

        async def task(i):
            async with p.acquire() as conn:
                await check_identity(conn, ident, app)
                expect_eq(await conn.fetchval("SELECT $1::int + 1", i), i + 1, "pooled query")
            expect_eq(await p.fetchval("SELECT current_setting('app.client_user')"), ident.user, "pool.fetchval")

        await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(40))), timeout=60)
    reset = "asyncpg's default reset" if default_reset else "reset without RESET ALL"
    step(f"create_pool(max_size=5), 40 concurrent acquires, {reset}")


async def worker(n, ident):
    app = f"drv-asyncpg-{n}"
    base = ITEMS_BASE + n * 1000
    conn = await connect(ident, app)
    try:
        stmt = await conn.prepare(
            "SELECT owner, payload, current_setting('app.client_user') FROM items WHERE id = $1"
        )
        for i in range(ROUNDS):
            await check_identity(conn, ident, app)
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO items (id, owner, payload) VALUES ($1, $2, $3)",
                    base + i,
                    ident.user,
                    bytes([n, i]),
                )
                got = tuple(await stmt.fetchrow(base + i))
                expect_eq(got, (ident.user, bytes([n, i]), ident.user), "own row")
            # Yield between transactions so the others interleave.
            await asyncio.sleep(0)
        res = await conn.execute(
            "DELETE FROM items WHERE id >= $1 AND id < $2 AND owner = $3",
            base,
            base + 1000,
            ident.user,
        )
        expect_eq(res, f"DELETE {ROUNDS}", "rows deleted")
    except Exception as e:
        raise AssertionError(f"connection {n} ({ident}): {type(e).__name__}: {e}") from e
    finally:
        await conn.close()


async def concurrent():
    ids = identities()
    await asyncio.wait_for(
        asyncio.gather(*(worker(n, ids[n % len(ids)]) for n in range(CONNECTIONS))),
        timeout=60,
    )
    step(f"asyncio.gather over {CONNECTIONS} connections x {ROUNDS} rounds, identities {ids}")


async def amain():
    ident = identities()[0]
    conn = await connect(ident, "drv-asyncpg")
    try:
        await check_identity(conn, ident, "drv-asyncpg")
        step("identity")
        await basics(conn)
        await prepared(conn, ident)
        await introspection(conn)
        await setup_table(conn)
        await executemany_and_transactions(conn)
        await copy(conn)
        await cursors(conn)
        await concurrent()
        await pool(ident)
        await check_identity(conn, ident, "drv-asyncpg")
        await conn.execute(f"DROP TABLE {TABLE}")
    finally:
        await conn.close()


if __name__ == "__main__":
    run_main(lambda: asyncio.run(amain()))
