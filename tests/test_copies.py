"""The copied plumbing of mae.py, dino.py, ijepa.py and prep/ultrasound.py is identical to its
origin in mae.py (tests/check_copies.py), and the checker fails on a copy that drifted, on broken
markers and on a missing copy."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("check_copies", os.path.join(REPO, "tests", "check_copies.py"))
check_copies = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_copies)

BLOCKS = ["cli", "listing", "frames", "stats", "processes", "log", "checkpoints", "diagnostic"]


def test_every_copy_in_the_repository_is_identical_to_its_origin():
    assert check_copies.check(REPO) == []
    origins, copies, problems = check_copies.scan(REPO)
    assert problems == []
    assert sorted(name for path, name in origins if path == "mae.py") == sorted(BLOCKS)
    for name in BLOCKS:  # each method file holds every block once
        holders = sorted(c.path for c in copies if c.name == name)
        expected = ["dino.py", "ijepa.py"] + (["prep/ultrasound.py"] if name == "listing" else [])
        assert holders == sorted(expected)


@pytest.fixture
def checkout(tmp_path):
    """The files holding copies, in a scratch checkout."""
    for path in ("mae.py", "dino.py", "ijepa.py", "prep/ultrasound.py"):
        os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.join(REPO, path), tmp_path / path)
    return tmp_path


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_a_drifted_copy_fails_and_fix_rewrites_it(checkout):
    assert check_copies.check(str(checkout)) == []
    original = (checkout / "dino.py").read_text()
    edit(checkout / "dino.py", "return 1", "return 2")  # frames_in(), inside the listing copy
    problems = check_copies.check(str(checkout))
    assert len(problems) == 1
    assert "dino.py:" in problems[0]
    assert "copy of mae.py: listing differs" in problems[0]
    assert "-    return 1" in problems[0] and "+    return 2" in problems[0]
    checker = [sys.executable, os.path.join(REPO, "tests", "check_copies.py"), "--root", str(checkout)]
    run = subprocess.run(checker, capture_output=True, text=True)
    assert run.returncode == 1 and "differs from its origin" in run.stdout
    run = subprocess.run(checker + ["--fix"], capture_output=True, text=True)
    assert run.returncode == 0 and "rewrote dino.py: listing" in run.stdout
    assert (checkout / "dino.py").read_text() == original
    # the origin moves on:
    edit(checkout / "mae.py", "return 1", "return 1  # an edit at the origin")
    assert len(check_copies.check(str(checkout))) == 3  # every copy is now behind,
    assert sorted(check_copies.fix(str(checkout))) == ["dino.py: listing", "ijepa.py: listing",
                                                       "prep/ultrasound.py: listing"]
    assert check_copies.check(str(checkout)) == []  # and --fix brings them along
    assert "return 1  # an edit at the origin" in (checkout / "prep/ultrasound.py").read_text()


def test_broken_markers_and_missing_copies_fail(checkout):
    ijepa = checkout / "ijepa.py"
    text = ijepa.read_text()
    edit(ijepa, "# End of shared block: stats\n", "")
    assert any("block 'stats'" in p and "no end line" in p for p in check_copies.check(str(checkout)))
    ijepa.write_text(text)
    edit(ijepa, "# Copied from mae.py: log\n", "# Copied from mae.py log\n")
    problems = check_copies.check(str(checkout))
    assert any("malformed marker" in p for p in problems)
    assert any("ijepa.py: lacks its copy of mae.py: log" in p for p in problems)
    ijepa.write_text(text)
    edit(ijepa, "# Copied from mae.py: log\n", "# Copied from mae.py: logs\n")
    edit(ijepa, "# End of shared block: log\n", "# End of shared block: logs\n")
    problems = check_copies.check(str(checkout))
    assert any("copy of mae.py: logs, which has no such block" in p for p in problems)
    ijepa.write_text(text)
    edit(checkout / "mae.py", "(origin; copies: dino.py, ijepa.py)\n", "(origin; copies: dino.py)\n")  # cli
    assert any("whose origin does not list ijepa.py" in p for p in check_copies.check(str(checkout)))
