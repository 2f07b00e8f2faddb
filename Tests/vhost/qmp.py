#!/usr/bin/env python3
"""Minimal QMP client for the shell tests (standard library only, so no venv is needed).

Usage: qmp.py [--timeout SECS] SOCKET 'JSON COMMAND' ['JSON COMMAND' ...]
       qmp.py SOCKET block-export-del '{"id": "exp0"}'     (shorthand: NAME [ARGUMENTS])

Negotiates capabilities, sends each command in turn and prints every line received (events
included) as compact JSON. Exit status: 0 all commands returned, 1 a command answered with an
error, 124 no answer within the timeout (per command; a hung daemon is what we look for), 2 the
socket could not be used.
"""
import json
import socket
import sys
import time


def main(argv):
    timeout = 10.0
    if len(argv) > 2 and argv[1] == "--timeout":
        timeout = float(argv[2])
        argv = argv[:1] + argv[3:]
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, rest = argv[1], argv[2:]
    commands = []
    if rest[0].lstrip().startswith("{"):
        commands = [json.loads(c) for c in rest]
    else:
        cmd = {"execute": rest[0]}
        if len(rest) > 1:
            cmd["arguments"] = json.loads(rest[1])
        commands = [cmd]

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        print(f"qmp.py: {path}: {e}", file=sys.stderr)
        return 2
    f = s.makefile("rb")

    def read_until_answer(deadline):
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                line = f.readline()
            except (socket.timeout, TimeoutError):
                return None
            if not line:
                return {"error": {"class": "EOF", "desc": "connection closed"}}
            msg = json.loads(line)
            print(json.dumps(msg, separators=(",", ":")), flush=True)
            if "return" in msg or "error" in msg or "QMP" in msg:
                return msg

    if read_until_answer(time.monotonic() + timeout) is None:
        return 124
    status = 0
    for cmd in [{"execute": "qmp_capabilities"}] + commands:
        s.sendall(json.dumps(cmd).encode() + b"\n")
        answer = read_until_answer(time.monotonic() + timeout)
        if answer is None:
            print(f"qmp.py: no answer to {cmd['execute']} within {timeout:g}s", file=sys.stderr)
            return 124
        if "error" in answer:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
