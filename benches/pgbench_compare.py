#!/usr/bin/env python3
"""pgbench through pgwarden, PgBouncer and straight to PostgreSQL, in one run.

Starts a throwaway PostgreSQL 15 (initdb in a temp dir, free port), PgBouncer
(if installed; transaction mode, same pool size) and pgwarden (the release
binary; transaction mode, identity assertion on) in each requested audit mode,
then runs pgbench against every target, interleaved, for several rounds, and
prints the median TPS, mean and p99 latency and the ratios.

CPU columns, per transaction: `cpu us/tx` is the pooler's own CPU (user +
kernel), `sys` its kernel share, and `box us/tx` the whole machine's busy
CPU (pgbench, PostgreSQL, the pooler, interrupts). On a machine whose cores
are all busy, TPS is about cores x busy fraction / `box us/tx`, so a
pooler's ratio to PgBouncer is set by how much `box us/tx` it adds.

    python3 benches/pgbench_compare.py --clients 20 --duration 10 --rounds 3

Not part of CI (it measures, it does not assert). `--smoke` runs it tiny.
"""
import argparse, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, time
import urllib.request

PG_BIN = "/usr/lib/postgresql/15/bin"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = os.geteuid() == 0
PASSWORD = "bench-pw"
# The client users pgbench logs in as (`--users N`: bench1..benchN, one
# pgbench process each, side by side).
USERS = ["bench"]
# `--pin`: the CPU pgbench runs on (with PostgreSQL); None runs it anywhere.
PGBENCH_CPU = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if IS_ROOT else cmd


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def psql(port, sql, db="postgres"):
    return run(["psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", db, "-c", sql]).stdout


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Cluster:
    def __init__(self, tmp, pool_size):
        self.dir = os.path.join(tmp, "pg")
        os.makedirs(self.dir)
        if IS_ROOT:
            shutil.chown(tmp, "postgres", "postgres")
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        data = os.path.join(self.dir, "data")
        run(as_postgres([f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"]))
        with open(os.path.join(data, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                    "max_connections = 500\nshared_buffers = 256MB\nsynchronous_commit = off\n")
        if IS_ROOT:
            for p in ("pg_hba.conf", "postgresql.conf"):
                shutil.chown(os.path.join(data, p), "postgres", "postgres")
        self.data = data
        run(as_postgres([f"{PG_BIN}/pg_ctl", "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "start"]))
        psql(self.port, f"""
            CREATE ROLE bench_role NOLOGIN;
            CREATE ROLE pgwarden_svc LOGIN NOINHERIT PASSWORD '{PASSWORD}';
            GRANT bench_role TO pgwarden_svc;
            CREATE ROLE bench LOGIN PASSWORD '{PASSWORD}';
            GRANT bench_role TO bench;""")
        run(["pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "postgres"])
        psql(self.port, "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO bench_role, bench;")

    def add_users(self, names):
        """Login users mapped like `bench` (member of bench_role)."""
        sql = "".join(f"CREATE ROLE {n} LOGIN PASSWORD '{PASSWORD}'; GRANT bench_role TO {n};"
                      for n in names if n != "bench")
        if sql:
            psql(self.port, sql)

    def stop(self):
        subprocess.run(as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"]), capture_output=True)


# pgwarden's metrics listener, by its client port.
ADMIN_PORTS = {}
COUNTERS = ("pgwarden_pool_waits_total", "pgwarden_pool_handoffs_total", "pgwarden_identity_assertions_total")


def scrape(port):
    """pgwarden's checkouts, affinity handoffs and identity assertions so
    far (None for other targets)."""
    admin = ADMIN_PORTS.get(port)
    if admin is None:
        return None
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in body.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in COUNTERS:
            values[parts[0]] = float(parts[1])
    return values


def start_pgwarden(tmp, pg_port, pool_size, variant, wrapper=(), wait=20, binary=None):
    """variant: an audit mode (off, async, group, sync), optionally followed
    by "+verify" (verify = transaction), "+role" (isolation = role; runs
    `pgwarden migrate`, which makes the per-role login and a tag key, so
    every gateway of the run then signs its client tag) and "+plain"
    (signed_tag = false) and "+wN" ([server] worker_threads = N).
    `wrapper` is a command that runs the binary (e.g. valgrind)."""
    audit, *extras = variant.split("+")
    verify = "transaction" if "verify" in extras else "off"
    isolation = "role" if "role" in extras else "shared"
    signed = "false" if "plain" in extras else "true"
    threads = next((int(e[1:]) for e in extras if e[:1] == "w" and e[1:].isdigit()), 0)
    # Only when asked: a baseline build older than the setting refuses the key.
    threads_line = f"worker_threads = {threads}\n" if threads else ""
    d = os.path.join(tmp, f"pgwarden-{variant}")
    os.makedirs(os.path.join(d, "policies"), exist_ok=True)
    with open(os.path.join(d, "policies", "bench.toml"), "w") as f:
        f.write('[[map]]\nclients = ["bench", "bench*"]\nrole = "bench_role"\n')
    port = free_port()
    admin = free_port()
    ADMIN_PORTS[port] = admin
    enabled = "false" if audit == "off" else "true"
    durability = "group" if audit == "off" else audit
    with open(os.path.join(d, "pgwarden.toml"), "w") as f:
        f.write(f'[server]\nlisten = "127.0.0.1:{port}"\n{threads_line}[backend]\nport = {pg_port}\nservice_user = "pgwarden_svc"\n'
                f'service_password = "{PASSWORD}"\n[pool]\nsize = {pool_size}\nisolation = "{isolation}"\n'
                f'[identity]\nverify = "{verify}"\nsigned_tag = {signed}\n'
                f'[audit]\nenabled = {enabled}\ndurability = "{durability}"\nstore = "audit"\n'
                f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
    binary = binary or os.path.join(ROOT, "target", "release", "pgwarden")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: build it first (cargo build --release)")
    if isolation == "role":
        out = subprocess.run([binary, "migrate", "-c", os.path.join(d, "pgwarden.toml"), "--admin-url",
                              f"postgres://postgres@127.0.0.1:{pg_port}/postgres"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"pgwarden migrate ({variant}) failed:\n{out.stdout}{out.stderr}")
    proc = subprocess.Popen([*wrapper, binary, "serve", "-c", os.path.join(d, "pgwarden.toml")],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"),
                            env=dict(os.environ, PGWARDEN_LOG="warn"))
    try:
        wait_port(port, wait)
    except RuntimeError:
        proc.kill()
        with open(os.path.join(d, "log")) as log:
            sys.exit(f"pgwarden ({variant}) did not start:\n{log.read()[-2000:]}")
    return proc, port


def start_floor(pg_port):
    """examples/relay_floor in front of the cluster: (process, port)."""
    binary = os.path.join(ROOT, "target", "release", "examples", "relay_floor")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: build it first (cargo build --release --example relay_floor)")
    port = free_port()
    proc = subprocess.Popen([binary, f"127.0.0.1:{port}", f"127.0.0.1:{pg_port}"], stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def pin(pg, pooler_pids):
    """`--pin`: every thread of the poolers on CPU 1; the postmaster and
    its processes (and so every backend forked later) and pgbench on CPU 0."""
    global PGBENCH_CPU
    if (os.cpu_count() or 1) < 2:
        sys.exit("--pin needs two CPUs")
    postmaster = open(os.path.join(pg.data, "postmaster.pid")).readline().strip()
    children = subprocess.run(["pgrep", "-P", postmaster], capture_output=True, text=True).stdout.split()
    for pid in [postmaster, *children]:
        subprocess.run(["taskset", "-a", "-cp", "0", pid], capture_output=True)
    for pid in pooler_pids:
        run(["taskset", "-a", "-cp", "1", str(pid)])
    PGBENCH_CPU = 0


def bouncer_pid(proc):
    """PgBouncer runs under runuser when we are root: find the real process."""
    for _ in range(20):
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if out:
            return int(out[0])
        if not IS_ROOT:
            return proc.pid
        time.sleep(0.1)
    return proc.pid


def start_pgbouncer(tmp, pg_port, pool_size):
    if not shutil.which("pgbouncer"):
        return None, None
    d = os.path.join(tmp, "pgbouncer")
    os.makedirs(d)
    port = free_port()
    with open(os.path.join(d, "users.txt"), "w") as f:
        for user in USERS:
            secret = psql(pg_port, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'").strip()
            f.write(f'"{user}" "{secret}"\n')
    with open(os.path.join(d, "pgbouncer.ini"), "w") as f:
        f.write(f"[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\n"
                f"auth_file = {d}/users.txt\npool_mode = transaction\ndefault_pool_size = {pool_size}\n"
                f"max_client_conn = 2000\nunix_socket_dir =\nlogfile = {d}/log\n")
    if IS_ROOT:
        shutil.chown(d, "postgres", "postgres")
        for p in os.listdir(d):
            shutil.chown(os.path.join(d, p), "postgres", "postgres")
    proc = subprocess.Popen(as_postgres(["pgbouncer", os.path.join(d, "pgbouncer.ini")]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_nofile)
    wait_port(port)
    return proc, port


def cpu_seconds(pid):
    """(utime + stime, stime) of a process (and its reaped children), in seconds."""
    if pid is None:
        return (0.0, 0.0)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    sys_ticks = int(fields[12]) + int(fields[14])
    return (ticks / os.sysconf("SC_CLK_TCK"), sys_ticks / os.sysconf("SC_CLK_TCK"))


def machine_busy_seconds():
    """CPU seconds the whole machine spent not idle (all processes, all
    cores, interrupts included), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_nofile():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def idle_clients_rss(pid, port, n):
    """RSS of the gateway before and while `n` logged-in clients sit idle."""
    before = rss_kib(pid)
    script = tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False)
    script.write("\\sleep 8 s\n")
    script.close()
    cmd = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "bench", "-c", str(n), "-j", "2",
           "-t", "1", "-f", script.name, "postgres"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PGPASSWORD=PASSWORD), preexec_fn=raise_nofile)
    peak = before
    end = time.time() + 30
    while proc.poll() is None and time.time() < end:
        peak = max(peak, rss_kib(pid))
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    os.unlink(script.name)
    return before, peak


def pgbench(port, clients, duration, args, pid=None):
    """One pgbench per user in USERS, side by side, the clients split among
    them; TPS summed from pgbench's own figures (login phase left out)."""
    per_user = max(1, clients // len(USERS))
    logdir = tempfile.mkdtemp()
    runs = []
    cpu_before = cpu_seconds(pid)
    busy_before = machine_busy_seconds()
    counters_before = scrape(port)
    for user in USERS:
        pin = ["taskset", "-c", str(PGBENCH_CPU)] if PGBENCH_CPU is not None else []
        cmd = pin + ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-c", str(per_user),
               "-j", str(min(per_user, 2)), "-T", str(duration), "-r", "--log",
               "--log-prefix", os.path.join(logdir, user)] + args + ["postgres"]
        runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PGPASSWORD=PASSWORD), preexec_fn=raise_nofile))
    outs = []
    for r in runs:
        out, err = r.communicate()
        outs.append((r.returncode, out, err))
    cpu, sys_cpu = (after - before for after, before in zip(cpu_seconds(pid), cpu_before))
    busy = machine_busy_seconds() - busy_before
    counters_after = scrape(port)
    # A pgbench that lost clients may still exit 0, without a tps line.
    if any(code != 0 or "tps = " not in out for code, out, _ in outs):
        shutil.rmtree(logdir)
        err = next(e for code, out, e in outs if code != 0 or "tps = " not in out)
        return {"tps": 0.0, "cpu_us": 0.0, "sys_us": 0.0, "box_us": 0.0, "avg_ms": 0.0, "p99_ms": 0.0, "failed": True,
                "handoff": None, "asserts": None,
                "err": err.strip()[-300:]}
    tps = sum(float(re.search(r"tps = ([\d.]+)", o).group(1)) for _, o, _ in outs)
    txns = sum(int(re.search(r"number of transactions actually processed: (\d+)", o).group(1)) for _, o, _ in outs)
    failed = any((m := re.search(r"number of failed transactions: (\d+)", o)) and int(m.group(1)) > 0
                 for _, o, _ in outs)
    lat = [int(line.split()[2]) for name in os.listdir(logdir) for line in open(os.path.join(logdir, name))]
    shutil.rmtree(logdir)
    lat.sort()
    handoff = asserts = None
    if counters_before and counters_after and txns:
        delta = {k: counters_after[k] - counters_before[k] for k in COUNTERS}
        checkouts = delta["pgwarden_pool_waits_total"]
        handoff = delta["pgwarden_pool_handoffs_total"] / checkouts if checkouts else 0.0
        asserts = delta["pgwarden_identity_assertions_total"] / txns
    return {"tps": tps, "cpu_us": cpu * 1e6 / txns if pid and txns else 0.0,
            "sys_us": sys_cpu * 1e6 / txns if pid and txns else 0.0,
            "box_us": busy * 1e6 / txns if txns else 0.0,
            "handoff": handoff, "asserts": asserts,
            "avg_ms": statistics.mean(lat) / 1000 if lat else 0,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] / 1000 if lat else 0,
            "failed": failed}


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanup in finally
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,20,200")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--audit", default="off,async,group",
                    help="pgwarden variants: audit modes off|async|group|sync, each optionally +verify, +role, +plain, +wN (N worker threads)")
    ap.add_argument("--workloads", default="select", help="comma list: select,select-extended,select-prepared,tpcb,connect")
    ap.add_argument("--users", type=int, default=1,
                    help="client users (bench1..N), one pgbench each, the clients split among them")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--idle-clients", type=int, default=1000, help="measure gateway RSS with this many idle clients (0: skip)")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="also run this pgwarden build (e.g. a copy of the previous release build) in every audit mode, "
                         "as before/<mode>, in the same rounds")
    ap.add_argument("--floor", action="store_true",
                    help="also run examples/relay_floor (a bare tokio byte relay, one server connection per client, "
                         "nothing parsed) as tokio-relay: the CPU per transaction no tokio relay can go under")
    ap.add_argument("--pin", action="store_true",
                    help="give the poolers CPU 1 to themselves, PostgreSQL and pgbench CPU 0 (taskset): "
                         "measures latency and throughput without the poolers' CPU taken from the load")
    a = ap.parse_args()
    if a.users > 1:
        USERS[:] = [f"bench{i}" for i in range(1, a.users + 1)]
    if a.smoke:
        a.clients, a.duration, a.rounds, a.idle_clients = "2", 1, 1, 10
    workloads = {"select": ["-S"], "select-extended": ["-S", "-M", "extended"], "select-prepared": ["-S", "-M", "prepared"],
                 "tpcb": [], "connect": ["-S", "-C"]}
    pids = {}
    tmp = tempfile.mkdtemp(prefix="pgwarden-bench-")
    procs = []
    pg = None
    try:
        pg = Cluster(tmp, a.pool_size)
        pg.add_users(USERS)
        targets = [("postgres", pg.port)]
        bouncer, bport = start_pgbouncer(tmp, pg.port, a.pool_size)
        if bouncer:
            procs.append(bouncer)
            targets.append(("pgbouncer", bport))
            pids["pgbouncer"] = bouncer_pid(bouncer)
        if a.floor:
            floor = start_floor(pg.port)
            procs.append(floor[0])
            targets.append(("tokio-relay", floor[1]))
            pids["tokio-relay"] = floor[0].pid
        builds = [("pgwarden", tmp, None)]
        if a.baseline:
            os.makedirs(os.path.join(tmp, "baseline"))
            builds.append(("before", os.path.join(tmp, "baseline"), os.path.abspath(a.baseline)))
        for mode in a.audit.split(","):
            for label, where, binary in builds:
                proc, port = start_pgwarden(where, pg.port, a.pool_size, mode, binary=binary)
                procs.append(proc)
                targets.append((f"{label}/{mode}", port))
                pids[f"{label}/{mode}"] = proc.pid
        if a.pin:
            pin(pg, list(pids.values()))
        results = {}
        for wl in a.workloads.split(","):
            for clients in [int(c) for c in a.clients.split(",")]:
                for r in range(a.rounds):
                    for name, port in targets:
                        res = pgbench(port, clients, a.duration, workloads[wl], pids.get(name))
                        results.setdefault((wl, clients, name), []).append(res)
        print(f"\n{'workload':16} {'clients':>7} {'target':18} {'tps':>10} {'avg ms':>8} {'p99 ms':>8} {'cpu us/tx':>9} {'sys':>5} {'box us/tx':>9} {'/pgbouncer':>10} {'/postgres':>9} {'handoff':>8} {'assert/tx':>9}")
        for wl in a.workloads.split(","):
            for clients in [int(c) for c in a.clients.split(",")]:
                med = {}
                for name, _ in targets:
                    rs = results[(wl, clients, name)]
                    med[name] = {k: statistics.median([r[k] for r in rs]) for k in ("tps", "avg_ms", "p99_ms", "cpu_us", "sys_us", "box_us")}
                    med[name]["failed"] = any(r["failed"] for r in rs)
                    for k in ("handoff", "asserts"):
                        vals = [r[k] for r in rs if r[k] is not None]
                        med[name][k] = statistics.median(vals) if vals else None
                for name, _ in targets:
                    m = med[name]
                    vs_b = f"{m['tps'] / med['pgbouncer']['tps']:.2f}" if "pgbouncer" in med and med["pgbouncer"]["tps"] else "-"
                    vs_p = f"{m['tps'] / med['postgres']['tps']:.2f}" if med["postgres"]["tps"] else "-"
                    flag = " FAILED" if m["failed"] else ""
                    cpu = f"{m['cpu_us']:.1f}" if m["cpu_us"] else "-"
                    sys_cpu = f"{m['sys_us']:.1f}" if m["cpu_us"] else "-"
                    handoff = f"{m['handoff']:.0%}" if m["handoff"] is not None else "-"
                    asserts = f"{m['asserts']:.2f}" if m["asserts"] is not None else "-"
                    print(f"{wl:16} {clients:>7} {name:18} {m['tps']:>10.0f} {m['avg_ms']:>8.3f} {m['p99_ms']:>8.3f} {cpu:>9} {sys_cpu:>5} {m['box_us']:>9.1f} {vs_b:>10} {vs_p:>9}"
                          f" {handoff:>8} {asserts:>9}{flag}")
        if a.idle_clients:
            print(f"\nRSS with {a.idle_clients} idle clients (KiB): before -> peak, per client")
            for name, port in targets:
                if name in pids:
                    if not os.path.exists(f"/proc/{pids[name]}/status"):
                        print(f"  {name:18} is no longer running")
                        continue
                    before, peak = idle_clients_rss(pids[name], port, a.idle_clients)
                    print(f"  {name:18} {before:>8} -> {peak:>8}   {(peak - before) / a.idle_clients:.1f} KiB/client")
    finally:
        cleanup(procs, pg, tmp)


def cleanup(procs, pg, tmp, timeout=10):
    """Stops the gateways (SIGTERM, then SIGKILL after `timeout` s), the cluster, and removes `tmp`."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
    if pg:
        pg.stop()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
