#!/usr/bin/env python3
"""Many management clients racing each other on one `dataplane serve` (issue 14).

Usage: qmp_race.py PATH_TO_DATAPLANE_BINARY [SECONDS] [SEED]

Eight real qemu.qmp clients send random mixes of object-add/del, device_add/del (one IOThread
or an iothread-vq-mapping), qom-set of a device's iothread, block-export-add/del,
x-blockdev-set-iothread and query-iothreads, on shared ids, while raw-socket clients send a
command and vanish before the answer. Every few seconds the clients pause (a quiet point)
and the invariants are checked:

- the server is alive, and every command was answered exactly once (no timeout, no reply
  to a vanished client's command reaches anyone else);
- each accepted device_del produced exactly one DEVICE_DELETED;
- the devices and IOThreads that exist are exactly those the accepted commands imply;
- every IOThread's holders are exactly the devices placed on it (as they report their own
  placement) and the block nodes exported or placed there;
- object-del succeeded only for IOThreads nothing held: no device or export is left on a
  deleted IOThread.

The run has two rounds of SECONDS / 2, each ended by deleting everything: the server's
descriptors and threads must be back to the baseline after each, and its memory must not grow
from the first round's end to the second's (a leak grows with every round; the allocator's
high-water mark from the devices alive at once does not). `quit` must exit 0. Seeded: the choices replay with the same SEED (the
interleaving is the scheduler's). Prints one line per check and 'race: N passed, M failed'.
"""
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter

from checklist import Checklist, start_server, wait_until, warm_up
from qemu.qmp import ExecuteError, QMPClient
from qmp_abuse import descriptors, resources

check = Checklist()
IOTHREADS = [f"iot{i}" for i in range(5)]
NODES = [f"n{i}" for i in range(3)]
CLIENTS = 8
ANSWER_TIMEOUT = 30


class Model:
    """What the accepted commands imply, and what was seen."""

    def __init__(self):
        self.iothread_adds = Counter()   # id -> accepted object-add
        self.iothread_dels = Counter()   # id -> accepted object-del
        self.devices = {}                # id -> device_add arguments (every attempt)
        self.device_added = set()        # ids whose device_add returned
        self.device_deleted = Counter()  # id -> accepted device_del
        self.vanished = set()            # ids a vanished client tried to add
        self.exports = {}                # id -> node
        self.export_added = set()
        self.export_deleted = set()
        self.events = Counter()          # DEVICE_DELETED per device id (observer)
        self.answered = 0
        self.timeouts = 0
        self.errors = Counter()          # error text kinds, for the report
        self.ops = Counter()


async def execute(qmp, model, cmd, args):
    """Runs one command; returns (ok, value or error text). A missing answer is a finding."""
    model.ops[cmd] += 1
    try:
        value = await asyncio.wait_for(qmp.execute(cmd, args), ANSWER_TIMEOUT)
        model.answered += 1
        return True, value
    except ExecuteError as e:
        model.answered += 1
        model.errors[f"{cmd}: {str(e)[:60]}"] += 1
        return False, str(e)
    except asyncio.TimeoutError:
        model.timeouts += 1
        return False, "timeout"


async def racer(path, idx, rng, model, pause, paused, stop, tmp, round_):
    qmp = QMPClient(f"racer{idx}")
    await qmp.connect(path)
    n = 0
    try:
        while not stop.is_set():
            if pause.is_set():
                paused[idx] = True
                while pause.is_set() and not stop.is_set():
                    await asyncio.sleep(0.01)
                paused[idx] = False
                continue
            n += 1
            op = rng.choices(["object-add", "object-del", "device_add", "device_add_map", "device_del", "qom-set",
                              "export-add", "export-del", "set-iothread", "query"],
                             weights=[3, 3, 5, 2, 4, 3, 2, 2, 2, 2])[0]
            if op == "object-add":
                iot = rng.choice(IOTHREADS)
                ok, _ = await execute(qmp, model, "object-add", {"qom-type": "iothread", "id": iot, "poll-max-ns": 0})
                if ok:
                    model.iothread_adds[iot] += 1
            elif op == "object-del":
                iot = rng.choice(IOTHREADS)
                ok, _ = await execute(qmp, model, "object-del", {"id": iot})
                if ok:
                    model.iothread_dels[iot] += 1
            elif op in ("device_add", "device_add_map"):
                dev = f"r{round_}c{idx}d{n}"
                args = {"driver": rng.choice(["virtio-blk", "virtio-blk-pci"]), "id": dev}
                if op == "device_add":
                    args["iothread"] = rng.choice(IOTHREADS)
                else:
                    args["num-queues"] = rng.randint(1, 3)
                    args["iothread-vq-mapping"] = [{"iothread": t} for t in rng.sample(IOTHREADS, rng.randint(1, 3))]
                model.devices[dev] = args
                ok, _ = await execute(qmp, model, "device_add", args)
                if ok:
                    model.device_added.add(dev)
            elif op == "device_del":
                alive = [d for d in model.device_added if not model.device_deleted[d]]
                if alive or model.devices:
                    # Mostly a device that exists (racing other clients for it), sometimes any.
                    dev = rng.choice(alive[-20:] if alive and rng.random() < 0.8 else list(model.devices)[-20:])
                    ok, _ = await execute(qmp, model, "device_del", {"id": dev})
                    if ok:
                        model.device_deleted[dev] += 1
            elif op == "qom-set":
                if model.devices:
                    dev = rng.choice(list(model.devices)[-20:])
                    await execute(qmp, model, "qom-set", {"path": f"/machine/peripheral/{dev}", "property": "iothread",
                                                          "value": rng.choice(IOTHREADS)})
            elif op == "export-add":
                exp = f"r{round_}c{idx}e{n}"
                node = rng.choice(NODES)
                model.exports[exp] = node
                ok, _ = await execute(qmp, model, "block-export-add", {
                    "type": "vhost-user-blk", "id": exp, "node-name": node, "iothread": rng.choice(IOTHREADS),
                    "addr": {"type": "unix", "path": os.path.join(tmp, f"{exp}.sock")}})
                if ok:
                    model.export_added.add(exp)
            elif op == "export-del":
                if model.exports:
                    exp = rng.choice(list(model.exports)[-10:])
                    ok, _ = await execute(qmp, model, "block-export-del", {"id": exp})
                    if ok:
                        model.export_deleted.add(exp)
            elif op == "set-iothread":
                await execute(qmp, model, "x-blockdev-set-iothread", {
                    "node-name": rng.choice(NODES), "iothread": rng.choice(IOTHREADS + [None]),
                    "force": rng.random() < 0.7})
            else:
                await execute(qmp, model, "query-iothreads", {})
    finally:
        await qmp.disconnect()


async def vanisher(path, rng, model, pause, stop, tag):
    """Negotiates, sends one command (sometimes only half of it) and closes without reading."""
    n = 0
    while not stop.is_set():
        if pause.is_set():
            await asyncio.sleep(0.01)
            continue
        n += 1
        dev = f"{tag}v{n}"
        args = {"driver": "virtio-blk", "id": dev, "iothread": rng.choice(IOTHREADS)}
        model.devices[dev] = args
        model.vanished.add(dev)
        cmd = rng.choice([
            {"execute": "device_add", "arguments": args},
            {"execute": "device_del", "arguments": {"id": rng.choice(list(model.devices)[-20:])}},
            {"execute": "query-iothreads"},
        ])
        if cmd["execute"] == "device_del":
            model.vanished.add(cmd["arguments"]["id"])
        raw = json.dumps(cmd).encode()
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            await reader.readline()
            writer.write(b'{"execute":"qmp_capabilities"}')
            await writer.drain()
            await reader.readline()
            writer.write(raw if rng.random() < 0.8 else raw[: len(raw) // 2])
            await writer.drain()
            writer.close()
        except OSError:
            pass
        await asyncio.sleep(rng.random() * 0.05)


async def observer(path, model, stop, listening):
    qmp = QMPClient("observer")
    await qmp.connect(path)
    try:
        with qmp.listener("DEVICE_DELETED") as listener:
            listening.set()
            while not stop.is_set():
                try:
                    ev = await asyncio.wait_for(listener.get(), 0.2)
                except asyncio.TimeoutError:
                    continue
                model.events[ev["data"].get("device")] += 1
    finally:
        await qmp.disconnect()


async def quiet_point(path, model, label, proc):
    """Checks the invariants; the racers are paused and nothing is in flight."""
    if proc.poll() is not None:
        check(f"{label}: the server is alive", False, f"exited with {proc.returncode}")
        raise SystemExit(check.summary("race") and 1)
    q = QMPClient("checker")
    await q.connect(path)
    try:
        # Unplugs accepted before the pause end with their events.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pending = [d for d, n in model.device_deleted.items() if model.events[d] < n and d not in model.vanished]
            if not pending:
                break
            await asyncio.sleep(0.05)
        wrong = {d: (n, model.events[d]) for d, n in model.device_deleted.items()
                 if d not in model.vanished and model.events[d] != n}
        check(f"{label}: one DEVICE_DELETED per accepted device_del", not wrong, wrong)
        twice = {d: n for d, n in model.events.items() if n > 1}
        check(f"{label}: no device deleted twice", not twice, twice)

        threads = await q.execute("query-iothreads")
        present = {t["id"] for t in threads}
        implied = {i for i in IOTHREADS if model.iothread_adds[i] - model.iothread_dels[i] == 1}
        check(f"{label}: the IOThreads are those object-add/del imply", present == implied, (present, implied))
        bad = {i: model.iothread_adds[i] - model.iothread_dels[i] for i in IOTHREADS
               if model.iothread_adds[i] - model.iothread_dels[i] not in (0, 1)}
        check(f"{label}: no IOThread added twice or deleted twice", not bad, bad)

        # Devices: which exist, and where each says it is.
        placement = {}
        for dev, args in model.devices.items():
            try:
                link = await q.execute("qom-get", {"path": f"/machine/peripheral/{dev}", "property": "iothread"})
            except ExecuteError:
                continue
            if link:
                placement[dev] = {link.removeprefix("/objects/")}
            else:
                placement[dev] = {e["iothread"] for e in args["iothread-vq-mapping"]}
            placement[dev] = (args["driver"], placement[dev])
        exists_wrong = []
        for dev in model.devices:
            if dev in model.vanished:
                continue
            expected = dev in model.device_added and model.device_deleted[dev] == 0
            if (dev in placement) != expected:
                exists_wrong.append((dev, dev in placement, expected))
        check(f"{label}: the devices are those device_add/device_del imply", not exists_wrong, exists_wrong[:10])
        orphaned = {d: p for d, (_, p) in placement.items() if not p <= present}
        check(f"{label}: no device is left on a deleted IOThread", not orphaned, orphaned)

        exports = await q.execute("query-block-exports")
        live_exports = {e["id"]: e["node-name"] for e in exports}
        implied_exports = {e for e in model.export_added if e not in model.export_deleted}
        check(f"{label}: the exports are those block-export-add/del imply", set(live_exports) == implied_exports,
              (sorted(live_exports), sorted(implied_exports)))
        holders_wrong = []
        for t in threads:
            qom = sorted(h["qom-path"] for h in t["holders"] if h["type"] == "qom-object")
            want = sorted((f"/machine/peripheral/{d}/virtio-backend" if drv == "virtio-blk-pci" else f"/machine/peripheral/{d}")
                          for d, (drv, p) in placement.items() if t["id"] in p)
            if qom != want:
                holders_wrong.append((t["id"], qom, want))
            for h in t["holders"]:
                if h["type"] == "block-node" and h["node-name"] not in NODES:
                    holders_wrong.append((t["id"], "unknown node", h))
            nodes_held = Counter(h["node-name"] for h in t["holders"] if h["type"] == "block-node")
            for n, count in nodes_held.items():
                # One for the node placed there, one per export of it running there.
                if count > 1 + sum(1 for node in live_exports.values() if node == n):
                    holders_wrong.append((t["id"], "too many holds of", n, count))
        check(f"{label}: holders are exactly the devices placed there and nodes exported or placed there",
              not holders_wrong, holders_wrong[:5])
        check(f"{label}: every command was answered (no timeout)", model.timeouts == 0, model.timeouts)
    finally:
        await q.disconnect()


async def cleanup(path):
    """Deletes every device, export and IOThread, waiting for the unplugs."""
    q = QMPClient("cleanup")
    await q.connect(path)
    with q.listener("DEVICE_DELETED") as listener:
        devices = set()
        for t in await q.execute("query-iothreads"):
            for h in t["holders"]:
                if h["type"] == "qom-object":
                    devices.add(h["qom-path"].split("/")[3])
        for d in devices:
            await q.execute("device_del", {"id": d})
        seen = set()
        while seen != devices:
            ev = await asyncio.wait_for(listener.get(), 10)
            seen.add(ev["data"].get("device"))
    for e in await q.execute("query-block-exports"):
        await q.execute("block-export-del", {"id": e["id"]})
    for n in NODES:
        await q.execute("x-blockdev-set-iothread", {"node-name": n, "iothread": None, "force": True})
    for t in await q.execute("query-iothreads"):
        await q.execute("object-del", {"id": t["id"]})
    left = await q.execute("query-iothreads")
    await q.disconnect()
    return left


async def main(binary, seconds, seed):
    tmp = tempfile.mkdtemp(prefix="dataplane-race-")
    path = os.path.join(tmp, "qmp.sock")
    args = [binary, "serve", "--qmp", path]
    for n in NODES:
        args += ["--blockdev", f"driver=null-co,node-name={n}"]
    proc = start_server(args)
    rc = None
    try:
        await warm_up(path, proc.pid)
        before = resources(proc.pid)
        fds_before = descriptors(proc.pid)

        print(f"     seed {seed}, {CLIENTS} clients and 2 vanishing ones, two rounds of {seconds / 2:g} s")
        model = Model()
        rng = random.Random(seed)
        point = 0
        rounds = []
        for round_ in (1, 2):
            stop, pause = asyncio.Event(), asyncio.Event()
            paused = [False] * CLIENTS
            listening = asyncio.Event()
            obs = asyncio.create_task(observer(path, model, stop, listening))
            await asyncio.wait_for(listening.wait(), 10)  # it listens before anything is deleted
            tasks = [asyncio.create_task(racer(path, i, random.Random(rng.random()), model, pause, paused, stop, tmp, round_))
                     for i in range(CLIENTS)]
            tasks += [asyncio.create_task(vanisher(path, random.Random(rng.random()), model, pause, stop, f"r{round_}x{k}"))
                      for k in range(2)]
            end = time.monotonic() + seconds / 2
            while time.monotonic() < end:
                await asyncio.sleep(min(3.0, max(0.0, end - time.monotonic())))
                pause.set()
                while not all(paused) and not any(t.done() for t in tasks):
                    await asyncio.sleep(0.01)
                # The vanishers' last commands land: their bytes are in their sockets, but the
                # monitor reads each socket in its own time and there is no event to wait for.
                # Their devices are probed, not predicted, so a late one can only be one the
                # probe saw or did not; the holders check compares against the probe.
                await asyncio.sleep(0.2)
                point += 1
                await quiet_point(path, model, f"quiet point {point}", proc)
                pause.clear()
            stop.set()
            results = await asyncio.gather(*tasks, obs, return_exceptions=True)
            failures = [repr(r) for r in results if isinstance(r, BaseException)]
            check(f"round {round_}: no client failed", not failures, failures[:3])
            check(f"round {round_}: server still running", proc.poll() is None)
            left = await cleanup(path)
            check(f"round {round_}: everything deleted at the end", left == [], left)
            # What was deleted is gone from the model too: the next round starts from nothing.
            model.iothread_dels.update({i: model.iothread_adds[i] - model.iothread_dels[i] for i in IOTHREADS})
            for d in model.devices:
                if d in model.device_added and not model.device_deleted[d]:
                    model.device_deleted[d] = 1
                    model.events[d] = max(model.events[d], 1)
            model.export_deleted |= model.export_added
            # The server lets go of the clients that left (and their threads) in its own time:
            # wait, bounded, until it is back to the baseline, then check.
            await wait_until(lambda: all(a <= b for a, b in zip(resources(proc.pid)[:2], before[:2])))
            now = resources(proc.pid)
            rounds.append(now)
            fds_now = descriptors(proc.pid)
            new = sorted(f"{k} -> {v}" for k, v in fds_now.items() if fds_before.get(k) != v)
            check(f"round {round_}: descriptors back to the baseline", now[0] <= before[0], f"{before[0]} -> {now[0]}: {new}")
            check(f"round {round_}: threads back to the baseline", now[1] <= before[1], f"{before[1]} -> {now[1]}")
        print(f"     {model.answered} answers; ops {dict(model.ops)}")
        print(f"     most common refusals: {model.errors.most_common(6)}")
        check("memory did not grow from the first round to the second (by more than 16 MiB)",
              rounds[1][2] <= rounds[0][2] + 16384, f"{rounds[0][2]} -> {rounds[1][2]} KiB")
        print(f"     server RSS: {before[2]} KiB at the start, {rounds[0][2]} after round 1, {rounds[1][2]} after round 2")

        q = QMPClient("quit")
        await q.connect(path)
        await q.execute("quit")
        await q.disconnect()
        rc = proc.wait(20)
        check("quit exits 0", rc == 0, rc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        check("socket removed", not os.path.exists(path))
    return check.summary("race")


if __name__ == "__main__":
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 20
    seed_arg = int(sys.argv[3]) if len(sys.argv) > 3 else random.randrange(1 << 31)
    sys.exit(0 if asyncio.run(main(sys.argv[1], secs, seed_arg)) else 1)
