"""The Debian packages of the postgres and browser tiers (PostgreSQL, Chromium), installed when missing: `make test`
runs this in the background while the toy trains, so their download and unpacking (about 80 s on a fresh machine)
overlap the training instead of holding up a test worker. Silent where they cannot be installed: the tests that need
them say why (a failure under CI=true, else a skip)."""
from __future__ import annotations

import browser_server
import postgres_server
from debian import Unavailable

if __name__ == "__main__":
    for install in (postgres_server.install, browser_server.install):
        try:
            install()
        except Unavailable:
            pass
