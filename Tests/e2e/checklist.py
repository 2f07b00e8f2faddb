"""The pass/fail bookkeeping the end-to-end scripts share: one line per check."""


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
