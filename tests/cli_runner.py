"""The CLI run in the test's own process: `run_cli(*args)` is `python -m lmmlab ARGS` without a fresh interpreter's
start-up (importing torch and transformers again costs seconds per call). It returns what `subprocess.run` would:
the exit code (argparse's exits included) and what the command printed. One test per command family still runs
the real subprocess, so the `python -m lmmlab` wiring stays covered."""
from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

from lmmlab.cli import main


def run_cli(*args: str) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse: --help, or a value its choices refuse
            code = exit_.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
