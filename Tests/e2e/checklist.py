"""What the end-to-end scripts share: pass/fail bookkeeping (one line per check), the warm-up
before a resource baseline, and waiting for what a server does on its own time."""
import asyncio
import queue
import subprocess
import sys
import threading
import os
import time

from qemu.qmp import QMPClient


class Checklist:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def __call__(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"ok   {name}")
        else:
            self.failed += 1
            print(f"FAIL {name} {detail}")

    def summary(self, label):
        print(f"{label}: {self.passed} passed, {self.failed} failed")
        return self.failed == 0


async def wait_until(predicate, timeout=10.0):
    """Polls `predicate` until it holds or `timeout` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def sockets(pid):
    """How many sockets process `pid` has open (its listener and its clients' connections)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return n


async def warm_up(path, pid):
    """A client, an IOThread and three hot-plug cycles: the runtime creates some of its threads
    and descriptors lazily, so a baseline taken before this would count them as growth.
    Returns once server `pid` has closed the warm-up client's connection (it does so when it
    reads the end of the stream, on its own time), so that the baseline counts no client."""
    idle = sockets(pid)
    q = QMPClient("warm")
    await q.connect(path)
    await q.execute("object-add", {"qom-type": "iothread", "id": "warm"})
    with q.listener("DEVICE_DELETED") as listener:
        for i in range(3):
            await q.execute("device_add", {"driver": "virtio-blk", "id": f"w{i}", "iothread": "warm"})
            await q.execute("device_del", {"id": f"w{i}"})
            await asyncio.wait_for(listener.get(), 10)
    await q.execute("object-del", {"id": "warm"})
    await q.disconnect()
    if not await wait_until(lambda: sockets(pid) <= idle):
        raise RuntimeError(f"the server kept the warm-up client's connection ({sockets(pid)} sockets, {idle} before it)")


def start_server(args, timeout=30):
    """Starts `dataplane serve ...` and returns once it printed its ready line (every socket it
    serves listens then). The rest of its standard error goes on to ours."""
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            raise RuntimeError(f"no ready line from {args[:2]} within {timeout} s")
        if line is None:
            raise RuntimeError(f"{args[:2]} exited with {proc.wait()} before it was ready")
        sys.stderr.write(line)
        if line.startswith("dataplane: ready"):
            break

    def forward():
        while (line := lines.get()) is not None:
            sys.stderr.write(line)
    threading.Thread(target=forward, daemon=True).start()
    return proc
