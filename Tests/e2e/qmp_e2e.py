#!/usr/bin/env python3
"""End to end: `dataplane serve` driven by the real qemu.qmp client (and a raw socket).

Usage: qmp_e2e.py PATH_TO_DATAPLANE_BINARY
Prints one line per check and a closing 'e2e: N passed, M failed'; exits non-zero on failure.
"""
import asyncio
import json
import os
import signal
import socket
import stat
import sys
import tempfile
import time

from checklist import Checklist, start_server
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

check = Checklist()


async def expect_error(qmp, cmd, args, text):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as e:
        return str(e) == text or text in str(e), str(e)
    return False, "no error"


def raw_exchange(path, payloads, read_until_lines):
    """Sends raw bytes on a fresh connection (after negotiating) and returns the lines read."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(10)
    f = s.makefile("rb")
    f.readline()  # greeting
    s.sendall(b'{"execute":"qmp_capabilities"}')
    f.readline()
    for p in payloads:
        s.sendall(p)
    lines = [f.readline().decode() for _ in range(read_until_lines)]
    s.close()
    return lines


async def main(binary):
    tmp = tempfile.mkdtemp(prefix="dataplane-e2e-")
    path = os.path.join(tmp, "qmp.sock")
    proc = start_server([binary, "serve", "--qmp", path])
    try:
        check("socket exists", os.path.exists(path))
        check("socket mode is 0600", stat.S_IMODE(os.stat(path).st_mode) == 0o600, oct(os.stat(path).st_mode))

        qmp = QMPClient("e2e")
        await qmp.connect(path)
        check("negotiated", True)
        version = await qmp.execute("query-version")
        check("query-version has the VersionInfo shape", "qemu" in version and "major" in version["qemu"], version)

        await qmp.execute("object-add", {"qom-type": "iothread", "id": "iot0"})
        threads = await qmp.execute("query-iothreads")
        check("query-iothreads lists iot0", [t["id"] for t in threads] == ["iot0"], threads)
        t0 = threads[0]
        check("QEMU's fields plus holders", set(t0) == {"id", "thread-id", "poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch", "holders"}, t0)
        tid = t0["thread-id"]
        check("the IOThread is a real thread of the server", os.path.exists(f"/proc/{proc.pid}/task/{tid}"))
        with open(f"/proc/{proc.pid}/task/{tid}/comm") as f:
            check("it is named 'IO iot0'", f.read().strip() == "IO iot0")

        ok, why = await expect_error(qmp, "object-add", {"qom-type": "iothread", "id": "iot0"},
                                     "attempt to add duplicate property 'iot0' to object (type 'container')")
        check("duplicate id refused with QEMU's text", ok, why)
        ok, why = await expect_error(qmp, "object-add", {"qom-type": "iothread", "id": "bad", "poll-max-ns": -1},
                                     "poll-max-ns value must be in range [0, 9223372036854775807]")
        check("negative poll-max-ns refused", ok, why)
        ok, why = await expect_error(qmp, "object-add", {"qom-type": "iothread", "id": "x", "bogus": 1},
                                     "Parameter 'bogus' is unexpected")
        check("unexpected argument refused", ok, why)

        await qmp.execute("device_add", {"driver": "virtio-blk", "id": "disk0", "iothread": "iot0"})
        threads = await qmp.execute("query-iothreads")
        check("the device holds the IOThread, in the holders series' union shape",
              threads[0]["holders"] == [{"type": "qom-object", "qom-path": "/machine/peripheral/disk0"}], threads)
        check("holders sits after thread-id, as in the series' schema",
              list(threads[0])[:3] == ["id", "thread-id", "holders"], list(threads[0]))
        ok, why = await expect_error(qmp, "object-del", {"id": "iot0"}, "object 'iot0' is in use, can not be deleted")
        check("object-del of a held IOThread refused", ok, why)
        ok, why = await expect_error(qmp, "device_add", {"driver": "virtio-blk", "id": "disk0", "iothread": "iot0"},
                                     "Duplicate device ID 'disk0'")
        check("duplicate device id refused", ok, why)

        await qmp.execute("qom-set", {"path": "/objects/iot0", "property": "poll-max-ns", "value": 1000})
        got = await qmp.execute("qom-get", {"path": "/objects/iot0", "property": "poll-max-ns"})
        check("qom-set then qom-get poll-max-ns", got == 1000, got)
        threads = await qmp.execute("query-iothreads")
        check("query-iothreads shows the live value", threads[0]["poll-max-ns"] == 1000, threads)
        ok, why = await expect_error(qmp, "qom-get", {"path": "/objects/nope", "property": "poll-max-ns"},
                                     "Device '/objects/nope' not found")
        check("qom-get on an unknown path", ok, why)

        hmp = await qmp.execute("human-monitor-command", {"command-line": "info iothreads"})
        check("info iothreads shows holders", "iot0:" in hmp and "holders=/machine/peripheral/disk0" in hmp, hmp)

        with qmp.listener("DEVICE_DELETED") as listener:
            await qmp.execute("device_del", {"id": "disk0"})
            event = await asyncio.wait_for(listener.get(), 10)
        check("DEVICE_DELETED after the drain", event["data"] == {"device": "disk0", "path": "/machine/peripheral/disk0"}, event)
        check("event has a timestamp", "seconds" in event.get("timestamp", {}), event)
        threads = await qmp.execute("query-iothreads")
        check("the holder is gone", threads[0]["holders"] == [], threads)
        ok, why = await expect_error(qmp, "device_del", {"id": "disk0"}, "Device 'disk0' not found")
        check("device_del twice is an error", ok, why)

        await qmp.execute("object-del", {"id": "iot0"})
        check("object-del", await qmp.execute("query-iothreads") == [])
        gone = False
        for _ in range(100):
            if not os.path.exists(f"/proc/{proc.pid}/task/{tid}"):
                gone = True
                break
            time.sleep(0.05)
        check("its thread is gone from /proc", gone)

        # Garbage, truncation and deep nesting on a raw socket; a valid command still answers.
        lines = raw_exchange(path, [b"@@@ ", b'{"execute": ', b"\x1b", b"[" * 2000 + b"]" * 2000,
                                    b'{"execute":"query-version","id":7}'], 3)
        check("garbage gets a parse error", "JSON parse error" in lines[0], lines)
        check("deep nesting hits the limit", "JSON nesting depth limit exceeded" in lines[1], lines)
        check("then a valid command is answered", json.loads(lines[2]).get("id") == 7, lines)
        lines = raw_exchange(path, [b"42 ", b'{"execute":"query-version","id":{"x":[1]}}'], 2)
        check("a scalar is not a QMP object", "QMP input must be a JSON object" in lines[0], lines)
        check("the id is echoed verbatim", json.loads(lines[1])["id"] == {"x": [1]}, lines)

        # The synchronous legacy client too (no ids).
        def legacy_roundtrip():
            legacy = QEMUMonitorProtocol(path)
            legacy.connect()
            try:
                return legacy.cmd_obj({"execute": "query-version", "arguments": {}})
            finally:
                legacy.close()
        reply = await asyncio.to_thread(legacy_roundtrip)
        check("legacy client: a command without id gets a reply without id",
              "qemu" in reply.get("return", {}) and "id" not in reply, reply)

        await qmp.execute("quit")
        await qmp.disconnect()
        rc = proc.wait(timeout=20)
        check("quit stops the server cleanly", rc == 0, rc)
        check("the socket is removed", not os.path.exists(path))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # SIGTERM (as Ctrl-C's SIGINT) stops a server cleanly too, with a device attached.
    proc = start_server([binary, "serve", "--qmp", path, "--iothread", "iot1"])
    try:
        qmp = QMPClient("e2e-term")
        await qmp.connect(path)
        await qmp.execute("device_add", {"driver": "virtio-blk", "id": "disk1", "iothread": "iot1", "backend": "delay:1ms"})
        threads = await qmp.execute("query-iothreads")
        check("--iothread creates an IOThread at start", [t["id"] for t in threads] == ["iot1"], threads)
        proc.terminate()
        rc = proc.wait(timeout=20)
        check("SIGTERM stops the server cleanly (devices drained, IOThreads joined)", rc == 0, rc)
        check("and removes the socket", not os.path.exists(path))
        try:
            await qmp.disconnect()
        except Exception:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # qemu-storage-daemon's CLI with QEMU 9.0+'s iothread list: a 2-queue export on 2 IOThreads.
    sock = path + ".vhost"
    proc = start_server([binary, "serve", "--qmp", path,
                             "--object", "iothread,id=iot0", "--object", "iothread,id=iot1",
                             "--blockdev", "driver=null-co,node-name=null0",
                             "--export", "type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,"
                                         f"addr.path={sock},num-queues=2,iothread.0=iot0,iothread.1=iot1"])
    try:
        qmp = QMPClient("e2e-iothread-list")
        await qmp.connect(path)
        threads = await qmp.execute("query-iothreads")
        check("--export ...,iothread.0=iot0,iothread.1=iot1: both IOThreads hold the export",
              [(t["id"], t["holders"]) for t in threads] ==
              [(i, [{"type": "block-node", "node-name": "null0"}]) for i in ("iot0", "iot1")], threads)
        await qmp.execute("block-export-del", {"id": "exp0"})
        threads = await qmp.execute("query-iothreads")
        check("and neither after block-export-del", all(t["holders"] == [] for t in threads), threads)
        proc.terminate()
        rc = proc.wait(timeout=20)
        check("SIGTERM stops that server cleanly", rc == 0, rc)
        try:
            await qmp.disconnect()
        except Exception:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # SIGTERM in the middle of commands from two clients (a device_add, a block-export-del
    # draining requests in a delay backend, a device_del): each client gets its answer or a
    # clean close, nothing hangs, the server exits 0 and removes its sockets.
    sock = os.path.join(tmp, "exp.sock")
    proc = start_server([binary, "serve", "--qmp", path, "--object", "iothread,id=iot0",
                             "--blockdev", "driver=null-co,node-name=null0",
                             "--export", f"type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path={sock},iothread=iot0"])
    try:
        clients = []
        for cmds in ([{"execute": "device_add", "arguments": {"driver": "virtio-blk", "id": "d0", "iothread": "iot0"}},
                      {"execute": "device_del", "arguments": {"id": "d0"}}],
                     [{"execute": "block-export-del", "arguments": {"id": "exp0"}},
                      {"execute": "query-iothreads"}]):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.settimeout(20)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b'{"execute":"qmp_capabilities"}')
            f.readline()
            s.sendall(b"".join(json.dumps(c).encode() for c in cmds))
            clients.append((s, f))
        proc.send_signal(signal.SIGTERM)
        outcomes = []
        for s, f in clients:
            lines = []
            try:
                while True:
                    line = f.readline()
                    if not line:
                        break
                    lines.append(json.loads(line))
                outcomes.append(("closed", lines))
            except socket.timeout:
                outcomes.append(("hung", lines))
            s.close()
        check("SIGTERM mid-command: every client answered or closed cleanly, none left hanging",
              all(o == "closed" for o, _ in outcomes), outcomes)
        check("... and every line it got is an answer or an event",
              all(("return" in m or "error" in m or "event" in m) for _, ls in outcomes for m in ls), outcomes)
        rc = proc.wait(timeout=20)
        check("SIGTERM mid-command: exit 0", rc == 0, rc)
        check("... and both sockets are removed", not os.path.exists(path) and not os.path.exists(sock))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return 0 if check.summary("e2e") else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
