"""`pip install` into a virtual environment, done by uv where uv can be had: the same packages, faster on a fresh
venv (`make venv lmms lab-deps` with empty caches on 2 cores: about 40 s; pip, which also compiles every module's
bytecode, took about 145 s). Used by the Makefile's set-up targets.

    python scripts/install.py VENV_PYTHON [-q] [--no-deps] [-e] REQUIREMENT ...

uv does not read pip's configuration, so the indexes, find-links and constraints pip would use (`pip config list`:
pip.conf files and PIP_* variables) are handed to it, and every index is searched for the best version as pip does
(`--index-strategy unsafe-best-match`). Its cache lies under $PIP_CACHE_DIR when that is set (so an empty pip cache
means an empty uv cache too), else in uv's default place. Where uv cannot be installed, or fails, pip does the work.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

# pip's options that uv takes under the same name; each may hold several whitespace-separated values.
SHARED = ("index-url", "extra-index-url", "find-links", "constraint")


def pip_config(python: str) -> dict[str, list[str]]:
    """The values pip's configuration gives each of SHARED for `pip install`: a PIP_* variable over an [install]
    section over [global], as pip ranks them."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    ranked: dict[str, tuple[int, list[str]]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        rank = {":env:": 2, "install": 1, "global": 0}.get(section, -1)
        if name in SHARED and rank >= 0 and rank >= ranked.get(name, (-1, []))[0]:
            ranked[name] = (rank, shlex.split(value.strip().strip("'\"")))
    return {name: values for name, (_, values) in ranked.items()}


def uv_for(python: str) -> Path | None:
    """The venv's uv, installed there first if it is missing; None where pip cannot get it."""
    uv = Path(python).parent / "uv"
    if not uv.exists():
        subprocess.run([python, "-m", "pip", "install", "-q", "uv"], capture_output=True)
    return uv if uv.exists() else None


def pip_install(python: str, args: list[str], why: str) -> int:
    print(f"scripts/install.py: {why}, so pip installs (slower)", file=sys.stderr)
    return subprocess.run([python, "-m", "pip", "install", *args]).returncode


def main(argv: list[str]) -> int:
    python, args = argv[0], argv[1:]
    uv = uv_for(python)
    if uv is None:
        return pip_install(python, args, "uv could not be installed")
    env = dict(os.environ)
    if env.get("PIP_CACHE_DIR") and not env.get("UV_CACHE_DIR"):
        env["UV_CACHE_DIR"] = str(Path(env["PIP_CACHE_DIR"]) / "uv")
    # No bytecode compiled here (uv's default; pip compiles every module it installs): that was most of a fresh venv's
    # time, for thousands of modules lmmlab never imports. Python writes the bytecode of what is imported, on first
    # import: the Makefile keeps PYTHONDONTWRITEBYTECODE out of its commands, and `make venv` imports the CLI once.
    options = ["--index-strategy", "unsafe-best-match"]
    for name, values in pip_config(python).items():
        options += [item for value in values for item in (f"--{name}", value)]
    if subprocess.run([str(uv), "pip", "install", "--python", python, *options, *args], env=env).returncode == 0:
        return 0
    return pip_install(python, args, "uv failed (above)")  # e.g. an index only pip can reach


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
