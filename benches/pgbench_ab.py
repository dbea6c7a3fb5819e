#!/usr/bin/env python3
"""A/B of pgwarden builds (or settings) under pgbench, in one run.

Starts one throwaway PostgreSQL 15 and one pgwarden per variant (all on the
same cluster, same audit mode), then runs pgbench against each in turn,
interleaved, for several rounds, and prints the median TPS and gateway CPU
time per transaction of each. This is how the closing notes' before/after
figures are made: build the "before" binary, copy it aside, build "after".

    cargo build --release && cp target/release/pgwarden /tmp/pgwarden-before
    # ...change, rebuild...
    python3 benches/pgbench_ab.py --audit group --clients 20,200 \\
        before=/tmp/pgwarden-before after=target/release/pgwarden -- -S -M extended

A variant is LABEL=BINARY, optionally followed by ,ENV=VALUE settings for
that process (e.g. after=target/release/pgwarden,TOKIO_WORKER_THREADS=1).
`--direct` adds PostgreSQL itself as a target, with ratios against it.
Not part of CI.
"""
import argparse, os, statistics, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgbench_compare as bench  # noqa: E402


def parse_variant(spec):
    label, _, rest = spec.partition("=")
    binary, *envs = rest.split(",")
    wrapper = ["env", *envs] if envs else []
    return label, os.path.abspath(binary), wrapper


def main():
    argv = sys.argv[1:]
    workload = ["-S"]
    if "--" in argv:
        i = argv.index("--")
        argv, workload = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser()
    ap.add_argument("--audit", default="off", help="off|async|group|sync, optionally +verify")
    ap.add_argument("--clients", default="20,200")
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--direct", action="store_true", help="also run against PostgreSQL itself")
    ap.add_argument("variants", nargs="+", help="LABEL=BINARY[,ENV=VALUE...]")
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="pgwarden-ab-")
    procs, pg = [], None
    try:
        pg = bench.Cluster(tmp, a.pool_size)
        targets = [("postgres", pg.port, None)] if a.direct else []
        for i, spec in enumerate(a.variants):
            label, binary, wrapper = parse_variant(spec)
            d = os.path.join(tmp, f"v{i}")
            os.makedirs(d)
            proc, port = bench.start_pgwarden(d, pg.port, a.pool_size, a.audit, wrapper=wrapper, binary=binary)
            procs.append(proc)
            targets.append((label, port, proc.pid))
        print(f"{'clients':>7} {'target':12} {'tps':>10} {'cpu us/tx':>9} {'/postgres':>9}  rounds (tps)")
        for clients in [int(c) for c in a.clients.split(",")]:
            runs = {label: [] for label, _, _ in targets}
            for _ in range(a.rounds):
                for label, port, pid in targets:
                    runs[label].append(bench.pgbench(port, clients, a.duration, workload, pid))
            direct = statistics.median(r["tps"] for r in runs["postgres"]) if a.direct else 0
            for label, _, pid in targets:
                tps = statistics.median(r["tps"] for r in runs[label])
                cpu = f"{statistics.median(r['cpu_us'] for r in runs[label]):.1f}" if pid else "-"
                ratio = f"{tps / direct:.2f}" if direct else "-"
                each = ", ".join(f"{r['tps']:.0f}" + (" FAILED" if r["failed"] else "") for r in runs[label])
                print(f"{clients:>7} {label:12} {tps:>10.0f} {cpu:>9} {ratio:>9}  {each}", flush=True)
    finally:
        bench.cleanup(procs, pg, tmp)


if __name__ == "__main__":
    main()
