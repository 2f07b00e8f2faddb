#!/usr/bin/env python3
"""Monitor under abuse (issue 7): 64 clients connect, send garbage and disconnect
mid-message, over and over, while one real qemu.qmp client hot-plugs devices on IOThreads.

Usage: qmp_abuse.py PATH_TO_DATAPLANE_BINARY [SECONDS]
Checks that the hot-plug client got every answer and every DEVICE_DELETED, that a fresh
client is served at the end, and that the server's descriptors, threads and memory are back
to where they were. Prints one line per check and 'abuse: N passed, M failed'; exits
non-zero on failure.
"""
import asyncio
import logging
import os
import random
import subprocess
import sys
import tempfile
import time

from checklist import Checklist, start_server, wait_until, warm_up
from qemu.qmp import QMPClient

check = Checklist()


def descriptors(pid):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def resources(pid):
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return fds, threads, rss


GARBAGE = [
    b"{", b"}", b"]]]]", b"\x00\x01\x02", b"\xff\xfe\xc3\x28", b'{"execute":', b'{"execute": "query-',
    b'{"execute":"qmp_capabilities"}', b'{"execute":"query-iothreads"}', b'[' * 2000, b'{"a":' * 600,
    b'"unterminated', b'{"execute":"device_del","arguments":{"id":"nope"}}', b"\x1b\x1b\r\n",
    b'{"execute":"object-add","arguments":{"qom-type":"iothread","id":"x' + b"y" * 5000,
    b'{"execute":"qom-set","arguments":{"path":"/objects/hot0","property":"poll-max-ns","value":-1}}',
]


async def abuser(path, stop, counters, rng):
    """Connects, sends a few random pieces, sometimes reads, disconnects mid-message."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
        except (OSError, asyncio.TimeoutError):
            counters["refused"] += 1
            await asyncio.sleep(0.01)
            continue
        counters["connections"] += 1
        try:
            if rng.random() < 0.5:
                await asyncio.wait_for(reader.readline(), 5)  # the greeting, sometimes
            for _ in range(rng.randint(1, 6)):
                piece = rng.choice(GARBAGE)
                cut = rng.randint(1, len(piece))  # often in the middle of a token
                writer.write(piece[:cut])
                counters["bytes"] += cut
            await writer.drain()
            if rng.random() < 0.3:
                try:
                    await asyncio.wait_for(reader.read(4096), 0.05)
                except asyncio.TimeoutError:
                    pass
        except (OSError, asyncio.TimeoutError):
            counters["errors"] += 1
        finally:
            writer.transport.abort()  # no shutdown: disconnect mid-message


async def hotplugger(path, seconds, stats):
    qmp = QMPClient("hotplug")
    await qmp.connect(path)
    await qmp.execute("object-add", {"qom-type": "iothread", "id": "hot0", "poll-max-ns": 4096})
    await qmp.execute("object-add", {"qom-type": "iothread", "id": "hot1", "poll-max-ns": 0})
    events = qmp.events
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        dev = f"d{n}"
        await asyncio.wait_for(qmp.execute("device_add", {"driver": "virtio-blk", "id": dev, "iothread": f"hot{n % 2}"}), 10)
        holders = await asyncio.wait_for(qmp.execute("query-iothreads"), 10)
        stats["holder_checks"] += 1
        mine = {"type": "qom-object", "qom-path": f"/machine/peripheral/{dev}"}
        if not any(mine in t.get("holders", []) for t in holders):
            stats["holder_mismatch"] += 1
        await asyncio.wait_for(qmp.execute("device_del", {"id": dev}), 10)
        while True:
            ev = await asyncio.wait_for(events.get(), 10)
            if ev["event"] == "DEVICE_DELETED" and ev["data"].get("device") == dev:
                break
        stats["cycles"] += 1
        n += 1
    left = await qmp.execute("query-iothreads")
    stats["holders_left"] = sum(len(t.get("holders", [])) for t in left)
    await qmp.execute("object-del", {"id": "hot0"})
    await qmp.execute("object-del", {"id": "hot1"})
    await qmp.disconnect()


async def main(binary, seconds):
    tmp = tempfile.mkdtemp(prefix="dataplane-abuse-")
    path = os.path.join(tmp, "qmp.sock")
    proc = start_server([binary, "serve", "--qmp", path])
    try:
        await warm_up(path, proc.pid)
        before = resources(proc.pid)
        fds_before = descriptors(proc.pid)

        stop = asyncio.Event()
        counters = {"connections": 0, "bytes": 0, "errors": 0, "refused": 0}
        stats = {"cycles": 0, "holder_checks": 0, "holder_mismatch": 0, "holders_left": -1}
        rng = random.Random(7)
        abusers = [asyncio.create_task(abuser(path, stop, counters, random.Random(rng.random()))) for _ in range(64)]
        try:
            await asyncio.wait_for(hotplugger(path, seconds, stats), seconds + 60)
            hot_ok = True
        except Exception as e:  # noqa: BLE001 - any failure of the hot-plug client is the finding
            hot_ok = False
            check("hot-plug client kept being answered", False, repr(e))
        stop.set()
        await asyncio.gather(*abusers, return_exceptions=True)
        print(f"     {counters['connections']} abusive connections, {counters['bytes']} bytes of garbage, "
              f"{stats['cycles']} device_add/device_del cycles in {seconds} s")
        if hot_ok:
            check("hot-plug client got every answer and DEVICE_DELETED", stats["cycles"] > 0, stats)
        check("abusers connected many times", counters["connections"] >= 64 * 3, counters)
        check("holders listed while attached, none left", stats["holder_mismatch"] == 0 and stats["holders_left"] == 0, stats)
        check("server still running", proc.poll() is None)

        q = QMPClient("after")
        await asyncio.wait_for(q.connect(path), 10)
        threads = await q.execute("query-iothreads")
        check("a fresh client is served afterwards", threads == [], threads)
        await q.disconnect()
        # The server closes the last clients' connections and joins the IOThreads' threads on
        # its own time: wait (bounded) until it is back to the baseline, then check.
        def back_to_baseline():
            fds, n_threads, _ = resources(proc.pid)
            return fds <= before[0] and n_threads <= before[1]
        await wait_until(back_to_baseline)
        after = resources(proc.pid)
        fds_after = descriptors(proc.pid)
        new = sorted(f"{k} -> {v}" for k, v in fds_after.items() if fds_before.get(k) != v)
        check("descriptors back to the baseline", after[0] <= before[0], f"{before[0]} -> {after[0]}: {new}")
        check("threads back to the baseline", after[1] <= before[1], f"{before[1]} -> {after[1]}")
        check("memory did not grow by more than 16 MiB", after[2] <= before[2] + 16384, f"{before[2]} -> {after[2]} KiB")
        print(f"     server: fds {before[0]} -> {after[0]}, threads {before[1]} -> {after[1]}, RSS {before[2]} -> {after[2]} KiB")
    finally:
        proc.terminate()
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        check("server exits cleanly on SIGTERM", rc == 0, rc)
        check("socket removed", not os.path.exists(path))
    return check.summary("abuse")


if __name__ == "__main__":
    # asyncio warns on every write to a peer that already went away: that is the point here.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 20
    sys.exit(0 if asyncio.run(main(sys.argv[1], secs)) else 1)
