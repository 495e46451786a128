"""A throwaway PostgreSQL server for tests.

Debian's binaries (`initdb`, `pg_ctl` on PATH or in /usr/lib/postgresql/<version>/bin; when missing and we are root,
`apt-get update` once and `apt-get install -y postgresql`, non-interactively). `initdb` + `pg_ctl` run in a fresh
temporary folder (data, log and socket), listening on 127.0.0.1 at a free port with `trust` authentication;
PostgreSQL refuses to run as root, so as root both run as the `postgres` user (runuser) in a folder it owns.
`stop()` stops the server (immediate mode) and removes the folder.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from debian import apt_install, free_port

START_TIMEOUT_S = 60


def _version(bin_dir: str) -> tuple[int, ...]:
    return tuple(int(x) for x in Path(bin_dir).parent.name.split(".") if x.isdigit())


def find_bin_dir() -> str | None:
    """The folder holding initdb and pg_ctl (the newest Debian version first), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: _version(os.path.dirname(p)))
    if found:
        return os.path.dirname(found[-1])
    on_path = shutil.which("pg_ctl")
    return os.path.dirname(os.path.realpath(on_path)) if on_path and shutil.which("initdb") else None


def install() -> str:
    """Debian's `postgresql` package, installed when missing; its bin folder."""
    return apt_install('postgresql', find_bin_dir, 'PostgreSQL (initdb, pg_ctl)')


class PostgresServer:
    """`with PostgresServer() as server:` a running server; `server.database(name)` creates a database and gives its
    SQLAlchemy URL (psycopg 3)."""

    def __init__(self) -> None:
        self.bin_dir = install()
        self.root = Path(tempfile.mkdtemp(prefix="lmmlab-pg-"))  # directly under /tmp: `postgres` can reach it
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bin_dir, args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, cwd=self.root, timeout=START_TIMEOUT_S + 30)

    def start(self) -> "PostgresServer":
        data, log = self.root / "data", self.root / "server.log"
        steps = [("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"),
                 ("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", str(START_TIMEOUT_S),
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root} -F", "start")]
        for step in steps:
            done = self._run(*step)
            if done.returncode != 0:
                server_log = log.read_text()[-1500:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"{step[0]} failed ({done.returncode}): {done.stdout[-800:]} {done.stderr[-800:]} "
                                   f"{server_log}")
            self.started = step[0] == "pg_ctl"
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def database(self, name: str) -> str:
        """A new empty database `name`; its URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
