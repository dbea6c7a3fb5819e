#!/usr/bin/env python3
"""Instructions per transaction in the gateway, counted by callgrind.

Starts a throwaway PostgreSQL 15 and pgwarden (release build) under
`valgrind --tool=callgrind`, warms up, zeroes the counters, runs a fixed
number of pgbench transactions, dumps, and prints instructions per
transaction for the whole process and for the heaviest functions
(inclusive). Instruction counts do not depend on machine load, so two builds
can be compared on a busy machine; the profile guides optimisations, it is
not a throughput figure. Kernel time (the sockets, fsync) is not counted, and
valgrind hides the CPU's SHA extensions, so with audit on the hash chain's
share is overstated: use `perf record` for the audit modes (with audit on,
the gateway may also not finish starting under valgrind within the
2-minute wait: sled's IO threads run very slowly there).

    python3 benches/callgrind_per_tx.py --audit off --transactions 2000
    python3 benches/callgrind_per_tx.py --audit off -- -S -M extended
    python3 benches/callgrind_per_tx.py --users 8 --clients 40 --pool-size 4

Not part of CI.
"""
import argparse, glob, os, re, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgbench_compare as bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--audit", default="off", help="off|async|group|sync, optionally +verify")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--pool-size", type=int, default=8,
                    help="fewer than --clients: sessions wait for connections and take handoffs")
    ap.add_argument("--transactions", type=int, default=1000, help="per client")
    ap.add_argument("--users", type=int, default=1,
                    help="client users (bench1..N), one pgbench each, the clients split among them: "
                         "connections change hands between identities")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--keep", help="copy the callgrind output file here")
    ap.add_argument("--binary", help="the pgwarden build to count (default: target/release/pgwarden)")
    ap.add_argument("pgbench_args", nargs="*", default=["-S"])
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pgwarden-callgrind-")
    pg = None
    proc = None
    try:
        pg = bench.Cluster(tmp, a.pool_size)
        if a.users > 1:
            bench.USERS = [f"bench{i}" for i in range(1, a.users + 1)]
            pg.add_users(bench.USERS)
        out = os.path.join(tmp, "callgrind.out")
        os.environ["PGWARDEN_WRAPPER"] = f"valgrind --tool=callgrind --callgrind-out-file={out}"
        proc, port = bench.start_pgwarden(tmp, pg.port, a.pool_size, a.audit, wrapper=os.environ["PGWARDEN_WRAPPER"].split(), wait=120,
                                         binary=a.binary)
        # Warm up: logins, pools, caches.
        run_pgbench(port, a.clients, 50, a.pgbench_args)
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True)
        txns = run_pgbench(port, a.clients, a.transactions, a.pgbench_args)
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1)
        dumps = sorted(glob.glob(out + "*"), key=os.path.getmtime)
        dump = [d for d in dumps if d != out][-1] if len(dumps) > 1 else dumps[-1]
        if a.keep:
            shutil.copy(dump, a.keep)
        report(dump, txns, a.top)
    finally:
        # valgrind needs time to write its last dump.
        bench.cleanup([proc] if proc else [], pg, tmp, timeout=60)


def run_pgbench(port, clients, per_client, args):
    """One pgbench per user in bench.USERS, side by side, the clients split
    among them; returns the transactions they processed."""
    per_user = max(1, clients // len(bench.USERS))
    runs = []
    for user in bench.USERS:
        cmd = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-c", str(per_user),
               "-j", str(min(per_user, 2)), "-t", str(per_client)] + args + ["postgres"]
        runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PGPASSWORD=bench.PASSWORD)))
    txns = 0
    for run in runs:
        out, err = run.communicate()
        if run.returncode != 0:
            sys.exit(f"pgbench failed: {err[-500:]}")
        txns += int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    return txns


def report(dump, txns, top):
    total = 0
    for line in open(dump):
        if line.startswith("summary:") or line.startswith("totals:"):
            total = int(line.split()[1])
    print(f"{txns} transactions, {total} instructions: {total / txns:,.0f} instructions per transaction")
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", f"--threshold=100", dump],
                         capture_output=True, text=True).stdout
    print(f"\n{'instr/tx':>10}  {'%':>5}  function (inclusive)")
    shown = 0
    for line in ann.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*([\d.]+)%\)\s+(?:\S+:)?(.*)", line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        name = re.sub(r"\s*\[.*\]$", "", m.group(3))
        print(f"{n / txns:>10,.0f}  {m.group(2):>5}  {name[:110]}")
        shown += 1
        if shown >= top:
            break


if __name__ == "__main__":
    main()
