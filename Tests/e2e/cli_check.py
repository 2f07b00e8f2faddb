#!/usr/bin/env python3
"""The command line as a user meets it: help, version, and bad values.

Usage: cli_check.py PATH_TO_DATAPLANE_BINARY
Help and version print to standard output and exit 0; a bad argument is one line on standard
error and exit 2, with the same message whichever way the value is spelled; a duration needs
its unit. Prints one line per check and 'cli: N passed, M failed'.
"""
import json
import os
import subprocess
import sys
import tempfile

from checklist import Checklist

check = Checklist()


def run(binary, *args, timeout=30):
    p = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def main(binary):
    for args in (["--help"], ["-h"], ["help"], []):
        rc, out, err = run(binary, *args)
        check(f"dataplane {' '.join(args) or '(nothing)'}: the overview and the subcommands, exit 0",
              rc == 0 and out.startswith("OVERVIEW:") and "SUBCOMMANDS:" in out and "serve" in out and err == "",
              (rc, out[:200], err[:200]))
    rc, out, err = run(binary, "--version")
    check("--version prints a version and exits 0", rc == 0 and out.startswith("dataplane ") and err == "", (rc, out, err))
    for sub, option in (("load", "--rate"), ("load", "--churn"), ("sweep", "--duration"), ("serve", "--export"),
                        ("soak", "--churn"), ("wake", "--think-ns"), ("demo", "--seconds")):
        for spelling in ([sub, "--help"], ["help", sub]):
            rc, out, err = run(binary, *spelling)
            check(f"dataplane {' '.join(spelling)}: its options, {option} among them, exit 0",
                  rc == 0 and "USAGE:" in out and option in out, (rc, out[:200], err[:200]))

    def bad(args, text):
        rc, out, err = run(binary, *args)
        lines = err.strip().splitlines()
        check(f"dataplane {' '.join(args)}: exit 2, one line: {text}",
              rc == 2 and len(lines) == 1 and text in lines[0] and out == "", (rc, out[:200], err[:300]))

    # A negative value gets the value's own message, spelled with a space or with '='.
    for args, text in ((["--poll-max-ns", "-5"], "--poll-max-ns must be >= 0"),
                       (["--qd", "-3"], "--qd must be in [1,"),
                       (["--rate", "-5"], "--rate must be in (0,"),
                       (["--duration", "-1s"], "--duration -1s: a duration cannot be negative")):
        bad(["load", *args], text)
        bad(["load", f"{args[0]}={args[1]}"], text)
    # A duration without its unit is refused, not read as nanoseconds.
    bad(["load", "--duration", "10"], "--duration 10: a duration needs a unit (ns, us, ms or s), e.g. 10s")
    bad(["soak", "--duration", "1"], "--duration 1: a duration needs a unit")
    bad(["load", "--churn", "5"], "--churn 5: a duration needs a unit")
    bad(["load", "--duration", "soon"], "--duration soon: not a duration")
    # Bad grid values are bad arguments too.
    bad(["sweep", "--qd-grid", "0"], "--qd-grid: bad value 0")
    bad(["sweep", "--guest-grid", "lazy"], "--guest-grid: bad value lazy")
    bad(["load", "--bogus"], "Unknown option '--bogus'")
    bad(["serve"], "nothing to serve")

    # --json names the two backends apart: the IOThreads' fd monitor, and the devices' block backend.
    rc, out, err = run(binary, "load", "--duration", "200ms", "--warmup", "100ms", "--backend", "nop", "--json")
    try:
        doc = json.loads(out)
    except ValueError:
        doc = {}
    check("load --json: 'fdmon' is io_uring or epoll, 'config.backend' the block backend, nothing called both",
          rc == 0 and doc.get("fdmon") in ("io_uring", "epoll") and doc.get("config", {}).get("backend") == "nop"
          and "backend" not in doc, (rc, out[:300], err[:200]))

    # serve says when it is ready, and what it serves.
    tmp = tempfile.mkdtemp(prefix="dataplane-cli-")
    qmp, sock = os.path.join(tmp, "qmp.sock"), os.path.join(tmp, "vu.sock")
    proc = subprocess.Popen([binary, "serve", "--qmp", qmp, "--blockdev", "driver=null-co,node-name=n0",
                             "--export", f"type=vhost-user-blk,id=exp0,node-name=n0,addr.type=unix,addr.path={sock}"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        check("serve prints one ready line naming what it serves",
              line.startswith("dataplane: ready (backend ") and f"QMP monitor on {qmp}" in line and f"export exp0 on {sock}" in line,
              line)
        check("... once both sockets exist", os.path.exists(qmp) and os.path.exists(sock))
    finally:
        proc.terminate()
        rc = proc.wait(20)
        check("serve exits 0 on SIGTERM", rc == 0, rc)
    return check.summary("cli")


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1]) else 1)
