"""Files: atomic writes (a temporary file in the same folder, then a rename, so a killed run never leaves half a result),
the results folder, lmmlab's cache folder and a lock for what is built into it once."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

CACHE_ENV = "LMMLAB_CACHE"


def cache_dir() -> Path:
    """Where lmmlab keeps what it builds once (embedded models, compiled kernels, layer databases): $LMMLAB_CACHE, else
    ~/.cache/lmmlab."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmmlab")


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive lock on the file `path` (created if missing) for the block: processes that build the same thing
    into the cache (the toy's training, SmolLM2's conversion) take turns, and the second finds it built. POSIX
    (fcntl), imported here so that the rest of lmmlab imports without it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(path: str | Path, *, is_current: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """`path`, built by `build(path)` unless `is_current(path)` already holds. The check is made again under a lock
    beside `path`, so processes that build the same thing (test workers, scale-out workers on one host) take turns and
    the second finds it built."""
    path = Path(path)
    if is_current(path):
        return path
    with locked(path.with_name(path.name + ".lock")):  # another process may be building it: wait, then look again
        if not is_current(path):
            build(path)
    return path


@contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed onto `path` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` to write; renamed onto `path` when the block ends (an existing folder is
    replaced only with `overwrite`, else it must be empty), removed if it raises: a folder at `path` is always
    complete, and a killed run leaves only a hidden `.{name}.partial-*`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if overwrite else path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def results_root(start: str | Path | None = None) -> Path:
    """The project's results/ folder, found from the working directory or a parent (notebooks run from notebooks/),
    else results/ under the working directory."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "lmmlab" / "__init__.py").exists() and (folder / "pyproject.toml").exists():
            return folder / "results"
    return here / "results"


def write_table(path: str | Path, rows) -> None:
    """A table as a CSV, atomically: a DataFrame, or results rows (dicts) without their per-item values (`per_item`: a
    list per row, which `*_items.csv` files carry where a table needs them)."""
    import pandas as pd

    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    write_text_atomic(path, table.drop(columns=["per_item"], errors="ignore").to_csv(index=False))
