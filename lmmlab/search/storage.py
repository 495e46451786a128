"""Where Optuna studies live. One URL names the storage; every search worker that names it shares its studies.

  sqlite:///results/studies.db            a file (one host; one worker, or a few at low write rates)
  postgresql://USER:PASS@HOST:PORT/DB     a PostgreSQL server (many hosts, many workers); the driver is psycopg 3
                                          (`pip install 'lmmlab[postgres]'`), or psycopg2 if only that is installed;
                                          postgresql+psycopg://... / postgresql+psycopg2://... name it explicitly
  journal:///results/studies.log          Optuna's JournalStorage on an append-only file (one host, many processes,
                                          no server)
  any other SQLAlchemy URL whose driver is installed (mysql+pymysql://..., ...)

After `sqlite:///` and `journal:///` a path is relative to the working directory unless it starts with `/`
(`journal:////tmp/s.log` is absolute), as in SQLAlchemy. A URL is checked before anything is written: a database
without its driver, or a server that cannot be reached or refuses the connection, is a one-line `ValueError`.

Heartbeats: a running trial records a heartbeat every `heartbeat` seconds; a RUNNING trial whose last heartbeat (or
start) is more than GRACE x `heartbeat` seconds old is taken for a killed worker's, and the next worker to start a
trial marks it FAIL and enqueues its parameters once more (`RetryHeartbeatStaleTrialCallback(max_retry=1)`). The RDB
storages do this in Optuna itself (the server's clock), plus, in `HeartbeatRDBStorage`, trials killed before their first
heartbeat (Optuna skips those); Optuna 5's JournalStorage has no heartbeats, so
`HeartbeatJournalStorage` keeps them as a trial system attribute (the host's clock: a journal file is one host's).
"""
from __future__ import annotations

import importlib.util
import time
import warnings
from datetime import datetime, timedelta
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # Optuna's own interface for storages with heartbeats
from optuna.storages._rdb import models as rdb_models  # the heartbeat table, which Optuna reads only privately
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

HEARTBEAT_S = 30  # seconds between a running trial's heartbeats
GRACE = 3  # a trial is stale after GRACE heartbeats missed
JOURNAL = "journal:///"
POSTGRES_DRIVERS = ("psycopg", "psycopg2")  # for a plain postgresql:// URL, the first installed
POSTGRES_EXTRA = "pip install 'lmmlab[postgres]'"
CONNECT_TIMEOUT_S = 10
_CREATE_LOCK = 0x6C6D6D6C  # pg_advisory_lock key held while a worker creates Optuna's tables
USAGE = "use sqlite:///FILE, postgresql://USER@HOST:PORT/DB or journal:///FILE"


def safe_url(url: str) -> str:
    """`url` with its password hidden, for messages."""
    if url.startswith(JOURNAL):
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def resolve_url(url: str) -> str:
    """`url` with its database driver resolved (a plain postgresql:// gets the installed psycopg); a `ValueError`
    that names what to install when the driver is missing."""
    if url.startswith(JOURNAL):
        return url
    if url.startswith("journal:"):
        raise ValueError(f"a journal storage URL is journal:///FILE (three slashes); got {url!r}")
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ValueError(f"not a storage URL: {url!r}; {USAGE}") from None
    if parsed.drivername == "postgresql":
        driver = next((d for d in POSTGRES_DRIVERS if importlib.util.find_spec(d) is not None), None)
        if driver is None:
            raise ValueError(f"no PostgreSQL driver is installed for {safe_url(url)}: {POSTGRES_EXTRA}")
        parsed = parsed.set(drivername=f"postgresql+{driver}")
    try:
        dialect = parsed.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise ValueError(f"unknown database {parsed.drivername!r} in storage URL {safe_url(url)}; {USAGE}") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        install = (POSTGRES_EXTRA if parsed.get_backend_name() == "postgresql"
                   else f"install a SQLAlchemy driver for {parsed.get_backend_name()}")
        raise ValueError(f"the database driver for {parsed.drivername} ({err.name}) is not installed: {install}") \
            from None
    return parsed.render_as_string(hide_password=False)


def _engine_kwargs(url: str) -> dict:
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if url.startswith("postgresql") else {}


def _one_line(err: BaseException) -> str:
    return " ".join(str(getattr(err, "orig", None) or err).split())


def check_storage(url: str) -> str:
    """Resolve `url` and, for a database server, connect once (writing nothing); a `ValueError` with one line (where
    and the server's reason) if it cannot be reached. Returns the resolved URL."""
    url = resolve_url(url)
    if url.startswith((JOURNAL, "sqlite")):
        return url
    parsed = sqlalchemy.engine.make_url(url)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(url))
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as err:
        where = f"{parsed.host or 'localhost'}:{parsed.port or 'default port'}"
        raise ValueError(f"cannot connect to the {parsed.get_backend_name()} database at {where}: {_one_line(err)}") \
            from None
    finally:
        engine.dispose()
    return url


@contextmanager
def _creating_tables(url: str) -> Iterator[None]:
    """Workers that start together would race to create Optuna's tables; on PostgreSQL one at a time does it."""
    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(url))
    try:
        with engine.connect() as connection:  # the lock is the session's: closing the connection also frees it
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _CREATE_LOCK})
            yield
    finally:
        engine.dispose()


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's JournalStorage with heartbeats: a running trial's system attribute HEARTBEAT holds the time
    (time.time()) of its last beat; it is stale when max(last beat, start) is more than `grace_period` s ago."""

    HEARTBEAT = "lmmlab:heartbeat"

    def __init__(self, backend: BaseJournalBackend, *, heartbeat_interval: int, grace_period: int,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, self.HEARTBEAT, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker took this trial for a dead one's and failed it

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running
                if now - max(t.system_attrs.get(self.HEARTBEAT, 0.0), t.datetime_start.timestamp())
                > self.grace_period]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


class HeartbeatRDBStorage(RDBStorage):
    """Optuna's RDBStorage, whose stale trials also include those killed before their first heartbeat: Optuna skips a
    RUNNING trial with no heartbeat row, so a worker killed in a trial's first moments would leave it RUNNING for
    ever (and every worker waiting on it). Such a trial is stale when its start (the worker's clock, as Optuna
    writes `datetime_start`) is more than `grace_period` s ago."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)  # trials whose last heartbeat is too old
        cutoff = datetime.now() - timedelta(seconds=self.grace_period)
        started = [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                   if t.datetime_start < cutoff]
        if not started:
            return stale
        beats = rdb_models.TrialHeartbeatModel
        with self.engine.connect() as connection:
            beaten = set(connection.execute(sqlalchemy.select(beats.trial_id).where(beats.trial_id.in_(started)))
                         .scalars())
        return stale + [trial_id for trial_id in started if trial_id not in beaten]


def check_heartbeat(heartbeat: int) -> None:
    if not isinstance(heartbeat, int) or heartbeat < 1:
        raise ValueError(f"heartbeat must be a whole number of seconds >= 1; got {heartbeat!r}")


def storage_for(url: str, *, heartbeat: int = HEARTBEAT_S) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url` (see the module docstring), with heartbeats every `heartbeat` s; a killed
    worker's trial is failed and retried once. The sqlite / journal file's folder is created."""
    check_heartbeat(heartbeat)
    url = check_storage(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        beats = dict(heartbeat_interval=heartbeat, grace_period=GRACE * heartbeat,
                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        if url.startswith(JOURNAL):
            path = Path(url.removeprefix(JOURNAL))
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(JournalFileBackend(str(path)), **beats)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///").split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
        try:
            with _creating_tables(url):
                return HeartbeatRDBStorage(url, engine_kwargs=_engine_kwargs(url), **beats)
        except sqlalchemy.exc.SQLAlchemyError as err:
            raise ValueError(f"cannot open the study storage {safe_url(url)}: {_one_line(err)}") from None
