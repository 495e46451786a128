"""Headless Chromium driven over the Chrome DevTools protocol, and the local servers it looks at, for tests.

Chromium: Debian's `chromium` package (on PATH; when missing and we are root, `apt-get update` once and `apt-get
install -y chromium`, non-interactively; about 85 s here). It runs headless with a throwaway profile and a free
loopback debugging port; `Browser.page()` opens a tab whose `goto`, `evaluate`, `wait_for` and `screenshot` speak
the protocol over a websocket (websocket-client, which jupyter_server brings).
Servers: `serve(command, url)` starts one as a subprocess and waits until `url` answers (JupyterLab, optuna-dashboard).
"""
from __future__ import annotations

import base64
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from debian import Unavailable, apt_install, free_port
from typing import Iterator

START_TIMEOUT_S = 60


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def install() -> str:
    """Debian's `chromium`, installed when missing; the path of its binary."""
    return apt_install('chromium', find_chromium, 'Chromium (`chromium` on PATH)')


def get_json(url: str, method: str = "GET", timeout: float = 5):
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as response:
        return json.loads(response.read())


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    """Polls `url` until it answers; fails when the process exits first or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@contextmanager
def serve(command: list[str], url: str, log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """`command` running (its output in `log`) once `url` answers; terminated afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_until_up(url, proc)
        except RuntimeError as err:
            raise RuntimeError(f"{err}; its log: {log.read_text()[-1500:]}") from None
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Page:
    """One tab, spoken to over the DevTools protocol."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        """A protocol command's result (events that arrive meanwhile are dropped)."""
        call = next(self.ids)
        self.ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def goto(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Emulation.setFocusEmulationEnabled", enabled=True)  # a headless tab has no focus otherwise
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, poll: float = 0.5):
        """Polls a JavaScript expression until it is truthy (one that raises, e.g. while the page loads, counts as
        falsy); its value. A TimeoutError names the expression and its last error."""
        deadline, error = time.time() + timeout, None
        while time.time() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as err:
                value, error = None, err
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"{expression!r} stayed falsy for {timeout} s" + (f" (last: {error})" if error else ""))

    def screenshot(self, path: str | Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.ws.close()


class Browser:
    """Headless Chromium with a throwaway profile; `page()` opens a tab. `close()` stops it."""

    def __init__(self, width: int = 1400, height: int = 950) -> None:
        if importlib.util.find_spec("websocket") is None:
            raise Unavailable("the DevTools client needs websocket-client (pip install websocket-client)")
        binary = install()
        self.profile = Path(tempfile.mkdtemp(prefix="lmmlab-chromium-"))
        self.port = free_port()
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                   "--disable-extensions", "--hide-scrollbars", f"--window-size={width},{height}",
                   f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}",
                   "--remote-debugging-address=127.0.0.1", "--remote-allow-origins=*", "about:blank"]
        self.log = self.profile / "chromium.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_up(f"http://127.0.0.1:{self.port}/json/version", self.proc)
        except RuntimeError as err:
            text = self.log.read_text(errors="replace")[-1500:]
            self.close()
            raise RuntimeError(f"Chromium did not start: {err}; {text}") from None

    def page(self) -> Page:
        target = get_json(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        return Page(target["webSocketDebuggerUrl"])

    def close(self) -> None:
        """Stops Chromium and every process it started (its own process group)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=10)
                time.sleep(0.5)  # its helpers leave with it
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.profile, ignore_errors=True)
