"""Keep the copied plumbing of the method files identical to its origin: the "Copied from"
discipline of huggingface/transformers (utils/check_copies.py), with explicit begin and end
lines.

A block is written once, in its origin file, between the two lines

    # Shared block: NAME (origin; copies: FILE, FILE, ...)
    # End of shared block: NAME

and copied verbatim, every character of every line between the markers, into each FILE it names,
between

    # Copied from ORIGIN: NAME
    # End of shared block: NAME

FILE and ORIGIN are paths relative to the repository root; every marker is a whole line starting at
column 0; blocks do not nest. No per-file substitutions: a block refers to names each file defines
itself (DEVELOPERS.md).

    python tests/check_copies.py                # report every difference; exit status 1 if there is one
    python tests/check_copies.py --fix          # rewrite every copy from its origin (make fix-copies)
    python tests/check_copies.py --root DIR     # another checkout
"""
import argparse
import difflib
import os
import re
import sys

ORIGIN = re.compile(r"# Shared block: ([\w-]+) \(origin; copies: ([\w./-]+(?:, [\w./-]+)*)\)")
COPY = re.compile(r"# Copied from ([\w./-]+): ([\w-]+)")
END = re.compile(r"# End of shared block: ([\w-]+)")
PREFIXES = ("# Shared block:", "# Copied from", "# End of shared block:")
SKIP = {".git", ".venv", "__pycache__", "runs", "node_modules"}


class Block:
    def __init__(self, path, kind, name, source, begin):
        self.path = path            # the file, relative to the root
        self.kind = kind            # "origin" or "copy"
        self.name = name
        self.source = source        # origin: the files holding copies; copy: the origin file
        self.begin = begin          # index of the begin marker line
        self.end = None             # index of the end marker line
        self.body = []              # the lines between the markers, newlines kept


def python_files(root):
    """Every .py file under root (hidden and environment folders skipped), as paths relative to
    root."""
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP and not x.startswith("."))
        out += [os.path.relpath(os.path.join(d, n), root) for n in sorted(names) if n.endswith(".py")]
    return out


def parse(root, path, problems):
    """The blocks of one file; malformed or unbalanced markers go to problems."""
    with open(os.path.join(root, path)) as f:
        lines = f.readlines()
    blocks = []
    current = None
    for i, line in enumerate(lines):
        text = line.rstrip("\n")
        if not text.startswith(PREFIXES):
            if current is not None:
                current.body.append(line)
            continue
        where = f"{path}:{i + 1}"
        origin = ORIGIN.fullmatch(text)
        copy = COPY.fullmatch(text)
        end = END.fullmatch(text)
        if not (origin or copy or end):
            problems.append(f"{where}: malformed marker {text!r}")
        elif end:
            if current is None or current.name != end.group(1):
                problems.append(f"{where}: end of block {end.group(1)!r} without its begin line")
            else:
                current.end = i
                blocks.append(current)
                current = None
        elif current is not None:
            problems.append(f"{where}: block {current.name!r} (line {current.begin + 1}) has no "
                            f"end line before this marker")
            current = None
        elif origin:
            copies = origin.group(2).split(", ")
            current = Block(path, "origin", origin.group(1), copies, i)
        else:
            current = Block(path, "copy", copy.group(2), copy.group(1), i)
    if current is not None:
        problems.append(f"{path}:{current.begin + 1}: block {current.name!r} has no end line")
    names = [b.name for b in blocks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{path}: more than one block named {name!r}")
    return blocks


def scan(root):
    """-> (origins {(file, name): Block}, copies [Block], problems [str])."""
    problems = []
    origins = {}
    copies = []
    for path in python_files(root):
        for b in parse(root, path, problems):
            if b.kind == "origin":
                origins[(path, b.name)] = b
            else:
                copies.append(b)
    return origins, copies, problems


def check(root):
    """Every difference between a copy and its origin, and every missing or unlisted copy -> [str].
    """
    origins, copies, problems = scan(root)
    have = {(c.source, c.name, c.path) for c in copies}
    for (path, name), o in sorted(origins.items()):
        for target in o.source:
            if (path, name, target) not in have:
                problems.append(f"{target}: lacks its copy of {path}: {name} (add the marker "
                                f"lines, then --fix)")
    for c in copies:
        o = origins.get((c.source, c.name))
        if o is None:
            problems.append(f"{c.path}:{c.begin + 1}: copy of {c.source}: {c.name}, which has no "
                            f"such block")
        elif c.path not in o.source:
            problems.append(f"{c.path}:{c.begin + 1}: copy of {c.source}: {c.name}, whose origin "
                            f"does not list {c.path} among its copies")
        elif c.body != o.body:
            diff = difflib.unified_diff(o.body, c.body, f"{c.source} ({c.name})", c.path, n=0)
            shown = "".join(list(diff)[:12])
            problems.append(f"{c.path}:{c.begin + 1}: copy of {c.source}: {c.name} differs from "
                            f"its origin (edit the origin, then --fix):\n{shown}")
    return problems


def fix(root):
    """Rewrite every copy whose body differs from its origin's -> the copies rewritten ["file:
    name"]."""
    origins, copies, _ = scan(root)
    done = []
    for path in sorted({c.path for c in copies}):
        with open(os.path.join(root, path)) as f:
            lines = f.readlines()
        mine = sorted((c for c in copies if c.path == path), key=lambda c: c.begin, reverse=True)
        rewritten = []
        for c in mine:  # bottom up: earlier line numbers stay valid
            o = origins.get((c.source, c.name))
            if o is not None and c.body != o.body:
                lines[c.begin + 1:c.end] = o.body
                rewritten.append(f"{path}: {c.name}")
        if rewritten:  # files already in step are left untouched
            with open(os.path.join(root, path), "w") as f:
                f.writelines(lines)
        done += rewritten
    return done


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fix", action="store_true", help="rewrite the copies from their origins")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="the repository root (default: the checkout this script is in)")
    a = p.parse_args(argv)
    if a.fix:
        for item in fix(a.root):
            print(f"rewrote {item}")
    problems = check(a.root)
    for item in problems:
        print(item)
    if not problems:
        print("copies: every copied block is identical to its origin")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
