"""lmmlab.files: what is built into the cache is built once, even by processes that ask for it at the same time, and
atomic writes leave nothing half-written."""
import subprocess
import sys
import textwrap

import pytest

from lmmlab.files import atomic_file, build_once

# A process that builds `target` (slowly, so that a second one arrives while it builds) and logs each build.
BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lmmlab.files import build_once

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(path):
        with open(log, "a") as f:
            f.write("built\\n")
        time.sleep(1.0)
        path.write_text("done")

    print(build_once(target, is_current=lambda p: p.is_file(), build=build))
""")


def test_two_processes_build_once(tmp_path):
    target, log = tmp_path / "thing", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(target), str(log)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(target)] * 2
    assert log.read_text().splitlines() == ["built"]  # the second waited for the lock, then found it built
    assert target.read_text() == "done"


def test_build_once_skips_a_current_build_and_rebuilds_a_stale_one(tmp_path):
    target, calls = tmp_path / "thing", []
    target.write_text("old")

    def build(path):
        calls.append(path)
        path.write_text("new")

    assert build_once(target, is_current=lambda p: True, build=build) == target
    assert calls == [] and target.read_text() == "old"
    build_once(target, is_current=lambda p: p.read_text() == "new", build=build)
    assert calls == [target] and target.read_text() == "new"


def test_atomic_file_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
