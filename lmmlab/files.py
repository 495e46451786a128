"""Files: atomic writes (a temporary file in the same folder, then a rename, so a killed run never leaves half a result),
the results folder, and lmmlab's cache folder."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CACHE_ENV = "LMMLAB_CACHE"


def cache_dir() -> Path:
    """Where lmmlab keeps what it builds once (embedded models, compiled kernels, layer databases): $LMMLAB_CACHE, else
    ~/.cache/lmmlab."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmmlab")


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    """Results rows (dicts) as a CSV, atomically, without their per-item values (`per_item`: a list per row, which
    `*_items.csv` files carry where a table needs them)."""
    import pandas as pd

    table = pd.DataFrame(list(rows))
    write_text_atomic(path, table.drop(columns=["per_item"], errors="ignore").to_csv(index=False))
