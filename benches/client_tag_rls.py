#!/usr/bin/env python3
"""Cost of the signed client tag in row-level security.

Starts a throwaway PostgreSQL 15 (the pgbench_compare cluster), runs
`pgwarden migrate` on it (schema, tag key), creates three copies of a
100,000-row table with the same RLS policy written three ways, and times
`SELECT count(*)` on each as the non-owner `bench` through pgwarden:

  plain     owner = <the pre-signing pgwarden.client_user()>, an inlinable
            SQL function reading the setting (this database's copy of the
            old definition, reading a plain tag pgwarden does not set, so
            the test sets it itself);
  per-row   owner = pgwarden.client_user()            (verified per row)
  per-stmt  owner = (SELECT pgwarden.client_user())   (verified once: an
            uncorrelated scalar subquery is an InitPlan, run once per
            statement)

    cargo build --release && python3 benches/client_tag_rls.py [--rows N] [--runs N]

Prints the median milliseconds per query of each. Not part of CI.
"""
import argparse, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgbench_compare as bench  # noqa: E402

import psycopg  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pgwarden-tag-")
    procs, pg = [], None
    try:
        pg = bench.Cluster(tmp, 4)
        proc, port = bench.start_pgwarden(tmp, pg.port, 4, "off")
        procs.append(proc)
        conf = os.path.join(tmp, "pgwarden-off", "pgwarden.toml")
        binary = os.path.join(bench.ROOT, "target", "release", "pgwarden")
        subprocess.run([binary, "migrate", "-c", conf, "--admin-url",
                        f"postgres://postgres@127.0.0.1:{pg.port}/postgres"], check=True, capture_output=True)
        tables = {
            "plain": "owner = public.plain_client_user()",
            "per-row": "owner = pgwarden.client_user()",
            "per-stmt": "owner = (SELECT pgwarden.client_user())",
        }
        sql = ["CREATE FUNCTION public.plain_client_user() RETURNS text LANGUAGE sql STABLE PARALLEL SAFE "
               "AS $$ SELECT nullif(pg_catalog.current_setting('app.plain_user', true), '') $$;"]
        for i, (name, using) in enumerate(tables.items()):
            t = f"rls_{i}"
            sql.append(f"CREATE TABLE {t} (owner text, v int);"
                       f"INSERT INTO {t} SELECT CASE WHEN g % 2 = 0 THEN 'bench' ELSE 'other' END, g "
                       f"FROM generate_series(1, {a.rows}) g;"
                       f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;"
                       f"CREATE POLICY p ON {t} USING ({using});"
                       f"GRANT SELECT ON {t} TO bench_role; ANALYZE {t};")
        bench.psql(pg.port, "\n".join(sql))
        dsn = f"host=127.0.0.1 port={port} user=bench password={bench.PASSWORD} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SET max_parallel_workers_per_gather = 0")
            c.execute("SET app.plain_user = 'bench'")
            print(f"{'policy':10} {'rows seen':>9} {'ms/query':>9}   ({a.rows} rows, median of {a.runs})")
            for i, name in enumerate(tables):
                seen = c.execute(f"SELECT count(*) FROM rls_{i}").fetchone()[0]
                times = []
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    c.execute(f"SELECT count(*) FROM rls_{i}").fetchone()
                    times.append((time.perf_counter() - t0) * 1000)
                print(f"{name:10} {seen:>9} {statistics.median(times):>9.2f}")
    finally:
        bench.cleanup(procs, pg, tmp)


if __name__ == "__main__":
    main()
