#!/usr/bin/env python3
"""Summarises the JUnit XML files of tests/drivers/psycopg-suite.sh.

Usage: psycopg-suite-report.py RESULTS_DIR

Reads RESULTS_DIR/{direct,tx,session}-{main,pool}.xml (written with
``-o junit_family=xunit1`` so each test case names its file) and the
matching ``.seconds`` files, and prints Markdown: a table of outcomes per
run, then for each pgwarden mode the tests that pass directly but fail or
error through pgwarden, grouped by their one-line error.

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


def load(path: str) -> dict[str, tuple[str, str]]:
    """node id -> (outcome, one-line message)."""
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
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
        nid = node_id(case)
        old = results.get(nid)
        if old is None or RANK[outcome] > RANK[old[0]]:
            results[nid] = (outcome, message)
    return results


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
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    versions = os.path.join(out, "versions.txt")
    if os.path.exists(versions):
        with open(versions) as f:
            print("Versions: " + "; ".join(line.strip() for line in f if line.strip()))
            print()

    for suite, title in SUITES:
        data: dict[str, dict[str, tuple[str, str]]] = {}
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
            for outcome, _ in data[run].values():
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
                for t, (o, _) in direct.items()
                if o == "passed" and t in got and got[t][0] in ("failed", "error")
            }
            newly_skipped = sorted(
                t for t, (o, _) in direct.items() if o == "passed" and got.get(t, ("",))[0] == "skipped"
            )
            missing = sorted(t for t in direct if t not in got)
            fixed = sorted(
                t for t, (o, _) in direct.items() if o in ("failed", "error") and got.get(t, ("",))[0] == "passed"
            )
            print(f"### {title}: pass directly, fail or error through {label} ({len(regressions)})\n")
            groups: dict[str, list[str]] = defaultdict(list)
            for t, (_, msg) in regressions.items():
                groups[cause(msg)].append(t)
            for c, ts in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                print(f"- **{len(ts)}×** `{c}`")
                for t in sorted(ts):
                    o, msg = regressions[t]
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
