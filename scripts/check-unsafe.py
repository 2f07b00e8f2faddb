#!/usr/bin/env python3
"""Finds unsafe constructs without a one-line argument beside them.

Usage: scripts/check-unsafe.py [DIR ...]   (default: Sources)

Every `@unchecked Sendable`, `nonisolated(unsafe)`, `Unmanaged`, `unowned(unsafe)` and
`@exclusivity(unchecked)` in the package's sources must say why it is sound: a comment on the
same line, or in the comment block right above it (the block may be a doc comment, and may
sit above attributes, above a group of declarations that use the same construct, or above the
first line of a statement that spans several). Prints each one that has none, and exits 1 if
there is any.
"""
import os
import re
import sys

CONSTRUCTS = {
    "@unchecked Sendable": re.compile(r"@unchecked\s+Sendable"),
    "nonisolated(unsafe)": re.compile(r"nonisolated\(unsafe\)"),
    "Unmanaged": re.compile(r"\bUnmanaged\b"),
    "unowned(unsafe)": re.compile(r"unowned\(unsafe\)"),
    "@exclusivity(unchecked)": re.compile(r"@exclusivity\(unchecked\)"),
}
# An argument is a comment; whether it argues well is for the reader (and the reviewer).
ARGUMENT = re.compile(r"\w{3,}")


def argument_above(lines, i, pattern):
    """The comments above line i: walking up over comment lines, attribute lines and lines of
    the same group (declarations that use the same construct), to the first blank line or other
    code. One comment may argue a whole group of declarations."""
    text = []
    j = i - 1
    while j >= 0:
        s = lines[j].strip()
        if s.startswith("//"):
            text.append(s)
        elif s.startswith("@") or pattern.search(s.split("//", 1)[0]):
            if "//" in s:
                text.append(s.split("//", 1)[1])
        else:
            break
        j -= 1
    return " ".join(text)


def check_file(path):
    problems = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        code = line.split("//", 1)[0]
        trailing = line.split("//", 1)[1] if "//" in line else ""
        for name, pattern in CONSTRUCTS.items():
            if not pattern.search(code):
                continue
            if trailing and ARGUMENT.search(trailing):
                continue
            # Inside a closure or a wrapped expression, the statement's first line carries the
            # comment: look above the enclosing lines of the same statement too.
            above = argument_above(lines, i, pattern)
            k = i
            while not (above and ARGUMENT.search(above)) and k > 0 and i - k < 6:
                prev = lines[k - 1].strip()
                if not prev or prev.startswith("//") or prev.endswith("{") and prev.startswith(("func ", "public func", "init", "deinit")):
                    break
                k -= 1
                above = argument_above(lines, k, pattern) + " " + above
            if above and ARGUMENT.search(above):
                continue
            problems.append(f"{path}:{i + 1}: {name} without an argument beside it: {line.strip()}")
    return problems


def main(dirs):
    problems = []
    for d in dirs:
        for root, _, files in os.walk(d):
            for name in sorted(files):
                if name.endswith(".swift"):
                    problems += check_file(os.path.join(root, name))
    for p in problems:
        print(p)
    print(f"check-unsafe: {len(problems)} unargued unsafe construct(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["Sources"]))
