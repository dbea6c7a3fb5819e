#!/usr/bin/env python3
"""Summarises the JUnit XML files of tests/drivers/psycopg-suite.sh.

Usage: psycopg-suite-report.py RESULTS_DIR [PSYCOPG_CHECKOUT]

Reads RESULTS_DIR/{direct,tx,session}-{main,pool}.xml (written with
``-o junit_family=xunit1`` so each test case names its file) and the
matching ``.seconds`` files, and prints Markdown: a table of outcomes per
run, then for each pgwarden mode the tests that pass directly but fail or
error through pgwarden, grouped by cause: a known cause when the failure
text or the test's source (read from PSYCOPG_CHECKOUT, if given) shows one
(the rules in CAUSES below: a heuristic, check the test), else the
one-line error with its numbers blanked.

A test counts once, with its worst outcome: failed (a <failure>, also when
its teardown errored too), else error (an <error> only: setup or teardown),
else skipped (xfail included), else passed.
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

RUNS = [
    ("direct", "direct"),
    ("tx", "pgwarden, transaction mode"),
    ("session", "pgwarden, session mode"),
]
SUITES = [("main", "psycopg tests"), ("pool", "psycopg_pool tests (tests/pool)")]
OUTCOMES = ["passed", "failed", "error", "skipped"]
RANK = {o: i for i, o in enumerate(["passed", "skipped", "error", "failed"])}


def node_id(case: ET.Element) -> str:
    name = case.get("name", "?")
    classname = case.get("classname", "")
    file = case.get("file")
    if file:
        module = file[:-3].replace("/", ".") if file.endswith(".py") else file
        rest = classname[len(module) :].lstrip(".") if classname.startswith(module) else ""
        return "::".join(p for p in (file, rest, name) if p)
    return f"{classname}::{name}"


def one_line(text: str | None) -> str:
    text = (text or "").strip()
    line = text.splitlines()[0] if text else ""
    line = re.sub(r"\s+", " ", line)
    return line if len(line) <= 220 else line[:217] + "..."


def load(path: str) -> dict[str, tuple[str, str, str]]:
    """node id -> (outcome, one-line message, full failure text)."""
    results: dict[str, tuple[str, str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message, text = "passed", "", ""
        for child in case:
            if child.tag == "failure":
                o = "failed"
            elif child.tag == "error":
                o = "error"
            elif child.tag == "skipped":
                o = "skipped"
            else:
                continue
            m = one_line(child.get("message") or child.text)
            if RANK[o] > RANK[outcome]:
                outcome, message = o, m
                text = (child.get("message") or "") + "\n" + (child.text or "")
        nid = node_id(case)
        old = results.get(nid)
        if old is None or RANK[outcome] > RANK[old[0]]:
            results[nid] = (outcome, message, text)
    return results


# (label, where to look: "text" = failure text, "src" = the test's source,
# regex). First match wins.
CAUSES = [
    (
        "collateral: a connection leaked by an earlier failing test was garbage-collected here",
        "text",
        r"was deleted while still open",
    ),
    ("the statement guard refuses dynamic SQL (identity.allow_dynamic_sql = false)", "text", r"dynamic SQL"),
    ("the statement guard refuses RESET ALL", "text", r"RESET ALL is not allowed"),
    (
        "pg_terminate_backend: conn.info.backend_pid is pgwarden's BackendKeyData pid, and the server "
        "backend belongs to the service user",
        "src",
        r"pg_terminate_backend",
    ),
    (
        "a notification's pid is the server backend's, not the client's BackendKeyData pid",
        "src",
        r"(\.pid|be_pid) == (.*backend_pid|npid)",
    ),
    ("a NOTIFY was not delivered", "src", r"notifies\("),
    (
        "a COPY TO the client abandoned ended without error: the cancel came after the COPY finished",
        "text",
        r"INTRANS.*== .*INERROR",
    ),
    (
        "pg_prepared_statements shows the server connection's shared statements, not the client's",
        "src",
        r"prepared_statements",
    ),
    (
        "the unnamed prepared statement does not outlive its transaction (26000)",
        "text",
        r"unnamed prepared statement does not exist",
    ),
    (
        "the unnamed prepared statement does not outlive its transaction (26000)",
        "src",
        r'(prepare|send_prepare)\(b""',
    ),
    ("application_name as the server shows it carries the client name", "src", r"application_name"),
    ("timing-based test (marked timing)", "src", r"@pytest\.mark\.timing"),
]


def test_source(checkout: str | None, nid: str) -> str:
    """The test function's source, decorators included, or ''."""
    if not checkout:
        return ""
    parts = nid.split("::")
    path, name = os.path.join(checkout, parts[0]), parts[-1].split("[")[0]
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for i, line in enumerate(lines):
        if re.match(rf"\s*(async\s+)?def {re.escape(name)}\(", line):
            start = i
            # Decorators and their arguments: the lines just above, up to a
            # blank one.
            while start > 0 and lines[start - 1].strip():
                start -= 1
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or lines[end][:1].isspace()):
                end += 1
            return "\n".join(lines[start:end])
    return ""


def classify(checkout: str | None, nid: str, message: str, text: str) -> str:
    src = test_source(checkout, nid)
    for label, where, pattern in CAUSES:
        if re.search(pattern, text if where == "text" else src):
            return label
    return cause(message)


def cause(message: str) -> str:
    """A message with its variable parts blanked, to group similar errors."""
    m = re.sub(r"^failed on (setup|teardown|call) with ", "", message).strip('"')
    m = re.sub(r"0x[0-9a-f]+", "0x…", m)
    m = re.sub(r"\b\d+(\.\d+)?\b", "N", m)
    m = re.sub(r"pgwarden_[0-9a-f]{32}", "pgwarden_…", m)
    return m if len(m) <= 160 else m[:157] + "..."


def fmt_seconds(s: str | None) -> str:
    if s is None:
        return ""
    n = int(s)
    return f"{n // 60}m{n % 60:02d}s"


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    checkout = sys.argv[2] if len(sys.argv) == 3 else None
    versions = os.path.join(out, "versions.txt")
    if os.path.exists(versions):
        with open(versions) as f:
            print("Versions: " + "; ".join(line.strip() for line in f if line.strip()))
            print()

    for suite, title in SUITES:
        data: dict[str, dict[str, tuple[str, str, str]]] = {}
        seconds: dict[str, str] = {}
        for run, _ in RUNS:
            xml = os.path.join(out, f"{run}-{suite}.xml")
            if not os.path.exists(xml) and os.path.exists(os.path.join(out, f"{run}-{suite}.log")):
                print(f"({run}-{suite}: no JUnit XML: the run died; see {run}-{suite}.log)\n")
            if os.path.exists(xml):
                try:
                    data[run] = load(xml)
                except ET.ParseError as e:
                    print(f"({xml}: unreadable: {e})\n")
            sec = os.path.join(out, f"{run}-{suite}.seconds")
            if os.path.exists(sec):
                with open(sec) as f:
                    seconds[run] = f.read().strip()
        if not data:
            continue
        print(f"## {title}\n")
        print("| | passed | failed | errors | skipped | total | time |")
        print("|---|---|---|---|---|---|---|")
        for run, label in RUNS:
            if run not in data:
                continue
            counts = {o: 0 for o in OUTCOMES}
            for outcome, _, _ in data[run].values():
                counts[outcome] += 1
            cells = " | ".join(str(counts[o]) for o in OUTCOMES)
            print(f"| {label} | {cells} | {len(data[run])} | {fmt_seconds(seconds.get(run))} |")
        print()

        direct = data.get("direct")
        if direct is None:
            print("(no direct run: no comparison)\n")
            continue
        for run, label in RUNS[1:]:
            if run not in data:
                continue
            got = data[run]
            regressions = {
                t: got[t]
                for t, (o, _, _) in direct.items()
                if o == "passed" and t in got and got[t][0] in ("failed", "error")
            }
            newly_skipped = sorted(
                t for t, (o, _, _) in direct.items() if o == "passed" and got.get(t, ("",))[0] == "skipped"
            )
            missing = sorted(t for t in direct if t not in got)
            fixed = sorted(
                t for t, (o, _, _) in direct.items() if o in ("failed", "error") and got.get(t, ("",))[0] == "passed"
            )
            print(f"### {title}: pass directly, fail or error through {label} ({len(regressions)})\n")
            groups: dict[str, list[str]] = defaultdict(list)
            for t, (_, msg, text) in regressions.items():
                groups[classify(checkout, t, msg, text)].append(t)
            for c, ts in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                print(f"- **{len(ts)}×** {c}")
                for t in sorted(ts):
                    o, msg, _ = regressions[t]
                    print(f"  - {t} ({o}): {msg}")
            if not regressions:
                print("(none)")
            print()
            if newly_skipped:
                print(f"Pass directly, skipped through {label} ({len(newly_skipped)}):\n")
                for t in newly_skipped:
                    print(f"- {t}: {got[t][1]}")
                print()
            if fixed:
                print(f"Fail or error directly, pass through {label} ({len(fixed)}): " + ", ".join(fixed) + "\n")
            if missing:
                print(f"Run directly but absent through {label} ({len(missing)}; the run stopped early?)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
