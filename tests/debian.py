"""What the test set-up needs from the machine: a Debian package installed when missing (as root, with apt-get),
and a free port on loopback. Used by postgres_server.py and browser_server.py."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from lmmlab.files import locked


class Unavailable(RuntimeError):
    """A server the tests need is not installed and could not be installed."""


def apt_install(package: str, find: Callable[[], str | None], what: str) -> str:
    """`find()` if it finds `what`; else Debian's `package` installed (apt-get update once, then install) and
    `find()` again. Raises Unavailable, saying why, where that cannot be done or does not help."""
    if (found := find()) is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"{what} is not installed and cannot be installed here (needs root and apt-get): "
                          f"apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with locked(Path(tempfile.gettempdir()) / "lmmlab-apt.lock"):  # test workers in parallel install one at a time
        if (found := find()) is not None:
            return found
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise Unavailable(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    if (found := find()) is None:
        raise Unavailable(f"apt-get installed {package}, but {what} was still not found")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
