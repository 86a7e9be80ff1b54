"""Durable storage of aggregator results in SQLite (WAL mode).

One row per (site, window): the aggregator stores a batch of results in one transaction and
acknowledges the MQTT messages of those windows only after :meth:`ResultStore.store` has returned,
so a crash between "inferred" and "stored" makes the broker redeliver instead of losing the window.
A window is named by its ``grid_start_ns`` (the site's window grid, whose phase this store keeps
in ``site_grid`` so it survives restarts): a redelivered (replayed) window has the same grid start
and is ignored, never duplicated. Results without a grid start (older callers) fall back to
``UNIQUE(site, window_start_ns)``.

Commits are ``synchronous=FULL`` by default: the aggregator acknowledges a window to the broker once
this returns, so the commit must survive a power cut, not only a crash of the process (see
``_configure`` for the trade-off; ``spar-bench runtime`` measures its cost).

Readers may be other threads (the metrics thread) or other processes (``spar-aggregator query``):
WAL mode lets them read committed rows while the aggregator keeps writing.

Stdlib only: this module runs on the edge box.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from edge_runtime.errors import AggregatorError

log = logging.getLogger(__name__)

#: Version of the schema this code writes, kept in ``PRAGMA user_version``. To change the schema,
#: bump it and append a migration to ``_MIGRATIONS`` (index i migrates version i to i + 1).
SCHEMA_VERSION = 2

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: the first schema.
    (
        """CREATE TABLE IF NOT EXISTS results (
               id INTEGER PRIMARY KEY,
               site TEXT NOT NULL,
               window_start_ns INTEGER NOT NULL,
               created_ns INTEGER NOT NULL,
               nodes_present INTEGER NOT NULL,
               payload TEXT NOT NULL,
               UNIQUE (site, window_start_ns)
           )""",
        # UNIQUE(site, window_start_ns) already indexes per-site time queries; these two serve
        # time queries across sites and the age-based retention sweep.
        "CREATE INDEX IF NOT EXISTS results_window_start ON results (window_start_ns)",
        "CREATE INDEX IF NOT EXISTS results_created ON results (created_ns)",
    ),
    # 1 -> 2: windows named by their start on the site's grid (median starts of two different partial
    # windows can be closer than half a window), and the grid's phase per site.
    (
        "ALTER TABLE results ADD COLUMN grid_start_ns INTEGER",
        "CREATE UNIQUE INDEX IF NOT EXISTS results_grid ON results (site, grid_start_ns) "
        "WHERE grid_start_ns IS NOT NULL",
        """CREATE TABLE IF NOT EXISTS site_grid (
               site TEXT NOT NULL,
               window_ns INTEGER NOT NULL,
               phase_ns INTEGER NOT NULL,
               PRIMARY KEY (site, window_ns)
           )""",
    ),
)

_NS_PER_DAY = 86_400 * 1_000_000_000
_Row = tuple[str, int, int, str, "int | None"]  # site, window_start_ns, nodes_present, payload, grid_start_ns


class ResultStore:
    """Results of the aggregator in one SQLite file; thread-safe, one writer, many readers.

    Args:
        path: database file (created with its parent folders when missing), or ``":memory:"``.
        retention_rows: keep at most this many rows (the oldest inserted go first); ``None``: no limit.
        retention_days: delete rows created longer ago than this; ``None``: no limit.
        retention_interval_s: run the retention sweep after a store at most this often.
        synchronous: ``"FULL"`` (default: an acknowledged window survives a power cut) or
            ``"NORMAL"`` (one fsync less per batch; see ``_configure`` for what it risks).
        readonly: open an existing store for reading only (for ``spar-aggregator query``): nothing
            is created or changed, :meth:`store` is refused.
        clock_ns: wall clock for ``created_ns`` and age retention (injectable for tests).
        monotonic: clock for the retention interval (injectable for tests).

    Raises:
        AggregatorError: the path cannot be opened or created, is not a database, or holds a
            schema newer than this code.
    """

    def __init__(self, path: str | Path, *, retention_rows: int | None = 100_000,
                 retention_days: float | None = 30.0, retention_interval_s: float = 60.0,
                 synchronous: Literal["NORMAL", "FULL"] = "FULL", readonly: bool = False,
                 busy_timeout_s: float = 5.0, clock_ns: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic):
        if retention_rows is not None and retention_rows < 0:
            raise AggregatorError(f"result store: retention_rows must be >= 0 or None, got {retention_rows}")
        if retention_days is not None and not (retention_days >= 0 and math.isfinite(retention_days)):
            raise AggregatorError(f"result store: retention_days must be >= 0 or None, got {retention_days}")
        if synchronous not in ("NORMAL", "FULL"):
            raise AggregatorError(f"result store: synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = str(path)
        self.retention_rows = retention_rows
        self.retention_days = retention_days
        self.retention_interval_s = retention_interval_s
        self.readonly = readonly
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._last_retention: float | None = None
        self._deleted = 0
        # One connection shared under a lock: every operation is short (a batch insert, an indexed
        # query), so serialising them in this process costs little, and close() can close the one
        # connection from any thread. Other processes get their own connections and read
        # concurrently thanks to WAL.
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = self._open(busy_timeout_s)
        try:
            self.journal_mode = self._configure(synchronous)
            if readonly:
                self._check_version()
            else:
                self._migrate()
        except sqlite3.Error as exc:
            self._conn.close()
            self._conn = None
            raise AggregatorError(f"result store {self.path}: cannot use it as a database: {exc}") from exc
        except AggregatorError:
            self._conn.close()
            self._conn = None
            raise

    # -- opening -----------------------------------------------------------------------------------

    def _open(self, busy_timeout_s: float) -> sqlite3.Connection:
        in_memory = self.path == ":memory:"
        try:
            if self.readonly:
                if in_memory or not Path(self.path).is_file():
                    raise AggregatorError(f"result store {self.path}: no such database file")
                uri = Path(self.path).resolve().as_uri() + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, check_same_thread=False,
                                       isolation_level=None)
            else:
                if not in_memory:
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is exactly one
                # transaction and nothing stays implicitly open between calls.
                conn = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False,
                                       isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise AggregatorError(f"result store {self.path}: cannot open or create: {exc}") from exc
        return conn

    def _configure(self, synchronous: str) -> str:
        conn = self._require()
        if self.readonly:
            # Changing the journal mode writes the file; a reader takes what the writer chose.
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
        if mode == "wal":
            # FULL in WAL mode: every commit fsyncs the WAL, so a window acknowledged to the broker
            # (which then forgets its messages) survives a power cut, the likeliest failure of a box
            # in a parking lot. NORMAL skips that fsync (it happens at checkpoints): a crash of this
            # process still loses nothing (committed frames are in the OS page cache), but a power
            # cut or OS crash may roll back the transactions since the last checkpoint, i.e. lose
            # acknowledged windows; the file is never corrupted. NORMAL saves one fsync per batch,
            # which matters on slow SD cards: `spar-bench runtime` measures both.
            conn.execute(f"PRAGMA synchronous={synchronous}")
        else:
            # No WAL (":memory:" or a file system without shared-memory support): NORMAL with a
            # rollback journal can corrupt the file on power loss, so insist on FULL there.
            if self.path != ":memory:":
                log.warning("result store %s: WAL unavailable (journal_mode=%s); using synchronous=FULL",
                            self.path, mode)
            conn.execute("PRAGMA synchronous=FULL")
        return mode

    def _check_version(self) -> None:
        version = int(self._require().execute("PRAGMA user_version").fetchone()[0])
        if version == 0:
            raise AggregatorError(f"result store {self.path}: not a result store (no schema)")
        if version > SCHEMA_VERSION:
            raise AggregatorError(f"result store {self.path}: schema version {version} is newer than "
                                  f"this code supports ({SCHEMA_VERSION}); upgrade spar-edge")

    def _migrate(self) -> None:
        conn = self._require()
        # IMMEDIATE takes the write lock before reading user_version, so two processes opening a new
        # file at the same time cannot both run the migrations.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise AggregatorError(f"result store {self.path}: schema version {version} is newer "
                                      f"than this code supports ({SCHEMA_VERSION}); upgrade spar-edge")
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                # PRAGMA takes no bound parameters; SCHEMA_VERSION is our own integer constant.
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AggregatorError(f"result store {self.path}: closed")
        return self._conn

    # -- writing -----------------------------------------------------------------------------------

    def store(self, results: list[dict[str, Any]]) -> int:
        """Insert a batch of results in one committed transaction; returns how many rows were new.

        See :meth:`insert_new`; this keeps only the count (a window counts as already stored when a
        row has exactly its ``window_start_ns``).
        """
        return sum(self.insert_new(results))

    def insert_new(self, results: list[dict[str, Any]], same_window_ns: int = 0,
                   window_ns: int | None = None) -> list[bool]:
        """Insert a batch of results in one committed transaction; per result, True if it was new.

        Each result needs ``site`` (str), ``window_start_ns`` (int) and ``nodes_present`` (int); the
        whole dict is stored as compact JSON. With ``grid_start_ns`` (int) and ``window_ns``, a window
        is already stored when a row of that site has the same grid start, and the site's grid phase
        (``grid_start_ns mod window_ns``) is recorded with it, in the same transaction. Without a
        grid start, a window is already stored when a row's start lies within ``same_window_ns`` of
        this one (strictly). An already stored window is left as it is (replays after a redelivery
        are harmless). The batch is validated before anything is written (see :meth:`validate`), so
        an invalid result rejects the whole batch. When this returns, the rows are committed (see
        ``_configure`` for what "durable" means).

        Raises:
            AggregatorError: an invalid result, a read-only or closed store, or SQLite failed (disk
                full, I/O error); then nothing of the batch is stored and the caller must not ack.
        """
        if self.readonly:
            raise AggregatorError(f"result store {self.path}: opened read-only, cannot store")
        if same_window_ns < 0:
            raise AggregatorError(f"result store: same_window_ns must be >= 0, got {same_window_ns}")
        if window_ns is not None and (isinstance(window_ns, bool) or not isinstance(window_ns, int)
                                      or window_ns <= 0):
            raise AggregatorError(f"result store: window_ns must be an integer > 0, got {window_ns!r}")
        rows = [self._row(i, result) for i, result in enumerate(results)]
        if not rows:
            return []
        with self._lock:
            conn = self._require()
            created_ns = int(self._clock_ns())
            try:
                with _immediate_transaction(conn):
                    new = [self._insert_if_new(conn, row, created_ns, same_window_ns) for row in rows]
                    if window_ns is not None:
                        self._record_grids(conn, rows, window_ns)
            except (sqlite3.Error, OverflowError) as exc:  # OverflowError: an int SQLite cannot hold
                raise AggregatorError(f"result store {self.path}: storing {len(rows)} results failed: "
                                      f"{exc}") from exc
            self._maybe_apply_retention()
        return new

    def validate(self, result: Mapping[str, Any]) -> None:
        """AggregatorError unless ``result`` can be stored (what :meth:`insert_new` checks first)."""
        self._row(0, result)

    def grid_phase(self, site: str, window_ns: int) -> int | None:
        """The phase of ``site``'s window grid of this length recorded by an earlier run, or None."""
        rows = self._read("SELECT phase_ns FROM site_grid WHERE site = ? AND window_ns = ?", (site, window_ns))
        return int(rows[0][0]) if rows else None

    @staticmethod
    def _record_grids(conn: sqlite3.Connection, rows: list[_Row], window_ns: int) -> None:
        for site in {row[0] for row in rows if row[4] is not None}:
            grid = next(row[4] for row in rows if row[0] == site and row[4] is not None)
            conn.execute("INSERT OR IGNORE INTO site_grid (site, window_ns, phase_ns) VALUES (?, ?, ?)",
                         (site, window_ns, grid % window_ns))

    @staticmethod
    def _insert_if_new(conn: sqlite3.Connection, row: _Row, created_ns: int, same_window_ns: int) -> bool:
        site, start, present, payload, grid = row
        if grid is not None:
            # Served by the unique (site, grid_start_ns) index.
            if conn.execute("SELECT 1 FROM results WHERE site = ? AND grid_start_ns = ?", (site, grid)).fetchone():
                return False
        # Served by the UNIQUE (site, window_start_ns) index: one range probe per result.
        elif same_window_ns and conn.execute(
                "SELECT 1 FROM results WHERE site = ? AND window_start_ns > ? AND window_start_ns < ? LIMIT 1",
                (site, start - same_window_ns, start + same_window_ns)).fetchone():
            return False
        before = conn.total_changes
        conn.execute("INSERT OR IGNORE INTO results (site, window_start_ns, created_ns, nodes_present, payload, "
                     "grid_start_ns) VALUES (?, ?, ?, ?, ?, ?)", (site, start, created_ns, present, payload, grid))
        return conn.total_changes > before

    def _row(self, index: int, result: Mapping[str, Any]) -> _Row:
        """Validate one result and turn it into (site, window_start_ns, nodes_present, payload,
        grid_start_ns or None)."""
        where = f"result store: result #{index}"
        if not isinstance(result, Mapping):
            raise AggregatorError(f"{where}: expected a dict, got {type(result).__name__}")
        missing = [key for key in ("site", "window_start_ns", "nodes_present") if key not in result]
        if missing:
            raise AggregatorError(f"{where}: missing {', '.join(missing)}")
        site = result["site"]
        if not isinstance(site, str) or not site:
            raise AggregatorError(f"{where}: site must be a non-empty string, got {site!r}")
        start = _as_int(result["window_start_ns"], f"{where}: window_start_ns")
        present = _as_int(result["nodes_present"], f"{where}: nodes_present")
        # Half the 64-bit range: sums and ranges built from a start must still fit SQLite's integers.
        if not -(2**62) <= start < 2**62:
            raise AggregatorError(f"{where}: window_start_ns {start} is outside +-2^62 ns")
        grid = result.get("grid_start_ns")
        if grid is not None:
            grid = _as_int(grid, f"{where}: grid_start_ns")
            if not -(2**62) <= grid < 2**62:
                raise AggregatorError(f"{where}: grid_start_ns {grid} is outside +-2^62 ns")
        if present < 0:
            raise AggregatorError(f"{where}: nodes_present must be >= 0, got {present}")
        try:
            # allow_nan=False: NaN is not JSON, and a NaN output means a poisoned input to find.
            payload = json.dumps(dict(result), separators=(",", ":"), default=_json_default, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise AggregatorError(f"{where}: not JSON-serialisable: {exc}") from exc
        return site, start, present, payload, grid

    # -- retention ---------------------------------------------------------------------------------

    def _maybe_apply_retention(self) -> None:
        now = self._monotonic()
        if self._last_retention is not None and now - self._last_retention < self.retention_interval_s:
            return
        self._last_retention = now
        try:
            self.apply_retention()
        except AggregatorError as exc:
            # The batch is already committed; failing store() now would make the caller withhold
            # acks for stored windows. Retention simply runs again at the next interval.
            log.warning("%s", exc)

    def apply_retention(self) -> int:
        """Delete rows beyond ``retention_rows`` (oldest inserted first) and older than
        ``retention_days`` now, in one transaction; returns how many rows were deleted."""
        if self.readonly:
            raise AggregatorError(f"result store {self.path}: opened read-only, cannot delete")
        if self.retention_rows is None and self.retention_days is None:
            return 0
        with self._lock:
            conn = self._require()
            try:
                with _immediate_transaction(conn):
                    before = conn.total_changes
                    if self.retention_days is not None:
                        cutoff = int(self._clock_ns()) - int(self.retention_days * _NS_PER_DAY)
                        conn.execute("DELETE FROM results WHERE created_ns < ?", (cutoff,))
                    if self.retention_rows is not None:
                        # Age of a row for the row limit = insertion order (id), not created_ns: an
                        # edge box without an RTC may boot with a wrong clock, and ids stay ordered.
                        conn.execute(
                            "DELETE FROM results WHERE id <= "
                            "(SELECT id FROM results ORDER BY id DESC LIMIT 1 OFFSET ?)",
                            (self.retention_rows,))
                    deleted = conn.total_changes - before
            except sqlite3.Error as exc:
                raise AggregatorError(f"result store {self.path}: retention failed: {exc}") from exc
            self._deleted += deleted
        if deleted:
            log.info("result store %s: retention deleted %d rows", self.path, deleted)
        return deleted

    @property
    def deleted_rows(self) -> int:
        """How many rows retention has deleted since this store was opened."""
        with self._lock:
            return self._deleted

    # -- reading -----------------------------------------------------------------------------------

    def query(self, site: str | None = None, since_ns: int | None = None, until_ns: int | None = None,
              limit: int | None = 100, newest_first: bool = True) -> list[dict[str, Any]]:
        """Stored results, filtered by site and ``since_ns <= window_start_ns < until_ns``.

        Returns the stored result dicts with ``id`` and ``created_ns`` added, ordered by window
        start (newest first by default), at most ``limit`` of them (``None``: all).
        """
        if limit is not None and limit < 0:
            raise AggregatorError(f"result store: limit must be >= 0 or None, got {limit}")
        where, params = self._where(site, since_ns, until_ns)
        order = "DESC" if newest_first else "ASC"
        sql = (f"SELECT id, created_ns, payload FROM results{where} "
               f"ORDER BY window_start_ns {order}, id {order} LIMIT ?")
        params.append(-1 if limit is None else int(limit))
        rows = self._read(sql, params)
        out: list[dict[str, Any]] = []
        for row_id, created_ns, payload in rows:
            result = json.loads(payload)
            result["id"] = row_id
            result["created_ns"] = created_ns
            out.append(result)
        return out

    def count(self, site: str | None = None) -> int:
        """Number of stored results, of one site or of all."""
        where, params = self._where(site, None, None)
        return int(self._read(f"SELECT COUNT(*) FROM results{where}", params)[0][0])

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"``, or the problems found, one per line."""
        return "\n".join(str(row[0]) for row in self._read("PRAGMA integrity_check", []))

    @staticmethod
    def _where(site: str | None, since_ns: int | None, until_ns: int | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if site is not None:
            clauses.append("site = ?")
            params.append(site)
        if since_ns is not None:
            clauses.append("window_start_ns >= ?")
            params.append(int(since_ns))
        if until_ns is not None:
            clauses.append("window_start_ns < ?")
            params.append(int(until_ns))
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def _read(self, sql: str, params: Iterable[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._require()
            try:
                return conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise AggregatorError(f"result store {self.path}: query failed: {exc}") from exc

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent); the last connection to close checkpoints the WAL."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({self.path!r}, journal_mode={getattr(self, 'journal_mode', '?')!r})"


def _as_int(value: Any, what: str) -> int:
    """An integer (Python or numpy), never a bool or a float that happens to be whole."""
    if isinstance(value, bool):
        raise AggregatorError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise AggregatorError(f"{what} must be an integer, got {value!r}") from None


def _json_default(obj: Any) -> Any:
    """JSON for numpy scalars and arrays (results carry model outputs) without importing numpy."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@contextlib.contextmanager
def _immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (the write lock is taken up front)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
