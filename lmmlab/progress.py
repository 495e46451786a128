"""Progress a person can see: every long stage shows what it is doing, how many of how many, and an ETA (tqdm, on
stderr). The library is silent by default (tests, notebooks that do not ask); the CLI turns bars on unless `--quiet`.
Off a terminal (a log file, CI) a bar writes one line every `LOG_INTERVAL` seconds instead of redrawing."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

ENABLED = False  # set by the CLI: True unless --quiet
LOG_INTERVAL = 30.0  # seconds between lines when stderr is not a terminal


def enable(on: bool) -> None:
    """Turn every bar that is not told otherwise on or off."""
    global ENABLED
    ENABLED = bool(on)


def bar(iterable=None, *, desc: str, total: int | None = None, enabled: bool | None = None, **options) -> tqdm:
    """A tqdm bar on stderr, shown when `enabled` (None: the module's switch); `unit`, `initial`... pass through."""
    show = ENABLED if enabled is None else enabled
    terminal = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=not show, file=sys.stderr, dynamic_ncols=terminal,
                mininterval=0.5 if terminal else LOG_INTERVAL, **options)
