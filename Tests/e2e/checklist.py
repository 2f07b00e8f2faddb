"""What the end-to-end scripts share: pass/fail bookkeeping (one line per check), and the
warm-up before a resource baseline."""
import asyncio

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


async def warm_up(path):
    """A client, an IOThread and three hot-plug cycles: the runtime creates some of its threads
    and descriptors lazily, so a baseline taken before this would count them as growth."""
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
    await asyncio.sleep(0.2)
