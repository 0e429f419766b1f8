"""The repository's own rules, checked: the method files read one statement per line within 100 columns,
their algorithm before the shared plumbing (DEVELOPERS.md); no file points at sources outside the repository or
tells how it was written; no multi-process test picks a port (torchrun --standalone or a file:// store)."""
import ast
import io
import os
import re
import subprocess
import tokenize

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_FILES = ["mae.py", "dino.py", "ijepa.py"]
MARKER = re.compile(r"# (Shared block: |Copied from )")
END = re.compile(r"# End of shared block: ")


def read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


@pytest.mark.parametrize("path", METHOD_FILES)
def test_method_files_read_one_statement_per_line(path):
    text = read(path)
    long = [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 100]
    assert not long, f"{path}: lines {long[:10]} run past 100 columns"
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    semicolons = [t.start[0] for t in tokens if t.type == tokenize.OP and t.string == ";"]
    assert not semicolons, f"{path}: statements joined with ';' on lines {semicolons}"
    packed = []
    blocks = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef, ast.ClassDef)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, blocks) and node.body[0].lineno == node.lineno:  # if x: y
            packed.append(node.lineno)
        if not isinstance(node, ast.Assign):
            continue
        if len(node.targets) > 1:  # a = b = ...
            packed.append(node.lineno)
        parallel = isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple)
        if parallel and len(node.targets[0].elts) == len(node.value.elts):  # a, b = x, y
            packed.append(node.lineno)
    assert not packed, f"{path}: several assignments packed into one statement on lines {sorted(packed)}"


@pytest.mark.parametrize("path", METHOD_FILES)
def test_the_algorithm_reads_before_the_plumbing(path):
    """Above the first shared block: the method; from there on only the blocks, comments and the
    `if __name__ == "__main__":` launch."""
    lines = read(path).splitlines()
    first = next(i for i, line in enumerate(lines) if MARKER.match(line))
    tree = ast.parse("\n".join(lines))
    defs = {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert defs["train_loop"] < first + 1 and defs["Config"] < defs["train_loop"]
    inside = False
    main = False
    stray = []
    for i, line in enumerate(lines[first:], first + 1):
        if MARKER.match(line):
            inside = True
        elif END.match(line):
            inside = False
        elif line == 'if __name__ == "__main__":':
            main = True
        elif not inside and line.strip() and not line.startswith("#") and not (main and line.startswith(" ")):
            stray.append(i)
    assert not stray, f"{path}: code outside the shared blocks after the first one, lines {stray[:10]}"


def tracked_files():
    """Every file of the checkout git knows (a fresh clone's files), else every file outside the
    environment and run folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
        return [p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
        files = []
        for d, dirs, names in os.walk(REPO):
            dirs[:] = [x for x in dirs if x not in skip]
            files += [os.path.relpath(os.path.join(d, n), REPO) for n in names]
        return files


def test_the_repository_speaks_for_itself():
    """README, BENCHMARKS, docstrings and comments cite public sources (a repository path and line, a
    paper section), never files outside the repository, and describe the project, not how it was
    written."""
    outside = re.compile(r"\.\./shared|shared/reference|\bsessions? (that|which) (built|wrote|made)")
    found = []
    for path in tracked_files():
        if path == os.path.relpath(__file__, REPO) or not os.path.isfile(os.path.join(REPO, path)):
            continue
        with open(os.path.join(REPO, path), "rb") as f:
            data = f.read()
        if b"\0" in data:  # images, arrays
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if outside.search(line):
                found.append(f"{path}:{n}: {line.strip()[:120]}")
    assert not found, "\n".join(found)


def test_multi_process_tests_pick_no_port():
    """A port found free by binding and releasing it can be taken by anything else before the launch
    binds it: launches use torchrun's own rendezvous (--standalone), a second group a file:// store."""
    picks = re.compile(r"\bsocket\b|MASTER_PORT|tcp://|\.bind\(|\bport \+ \d")
    problems = []
    here = os.path.basename(__file__)
    for name in sorted(os.listdir(os.path.join(REPO, "tests"))):
        if not name.endswith(".py") or name == here:
            continue
        for n, line in enumerate(read(os.path.join("tests", name)).splitlines(), 1):
            launch = re.search(r'"-m", "torch\.distributed\.run"', line)
            if picks.search(line) or (launch and "--standalone" not in line):
                problems.append(f"tests/{name}:{n}: {line.strip()}")
            if "init_process_group(" in line and "file://" not in line:
                problems.append(f"tests/{name}:{n}: {line.strip()}")
    assert not problems, "\n".join(problems)
