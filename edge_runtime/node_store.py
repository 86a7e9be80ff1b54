"""Nodes that joined or moved in the field, kept in the aggregator's SQLite file across restarts.

The site layout says where the nodes were when the site was set up; births say where they are now.
After a restart the broker hands over the backlog it kept for the persistent session *before* the
retained births (those come with the new subscription), so a registry that starts from the layout
alone would refuse a joined node's backlog as ``unknown_node`` and place a moved node's backlog at
its old position. :class:`~edge_runtime.node_registry.NodeRegistry` therefore writes every joined
or moved node here when it accepts its birth and reads them back in its constructor, before the
first message is processed.

One table, ``field_nodes``, in the same file as the results (``AggregatorConfig.database``), through
its own connection: the result store owns ``results`` and ``PRAGMA user_version``; this module only
ever creates its own table (``CREATE TABLE IF NOT EXISTS``) and touches nothing else.

Writes happen on the ingest path (a birth), so they never raise: a failed write is logged and
counted in :attr:`NodeStore.failures`, and the registry in memory stays right; only the next restart
would miss that change. Opening and reading happen at start-up and fail loudly (AggregatorError).

Stdlib (and spar_wire) only: this module runs on the edge box.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import AggregatorError
from spar_wire.numbers import is_finite_number

log = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS field_nodes (
    site TEXT NOT NULL,
    node TEXT NOT NULL,
    position TEXT NOT NULL,         -- JSON list of metres in the site frame
    modalities TEXT NOT NULL,       -- JSON object: modality -> feature hash the node was accepted with
    node_index INTEGER NOT NULL,    -- structural slot it had (recomputed on restore, see the registry)
    description TEXT NOT NULL,
    bd_seq INTEGER NOT NULL,
    from_layout INTEGER NOT NULL,   -- 1: a layout node that moved; 0: a node that joined
    layout_position TEXT,           -- JSON, layout nodes only: the layout position when it moved
    updated_ns INTEGER NOT NULL,
    PRIMARY KEY (site, node)
)"""


@dataclass(frozen=True)
class StoredNode:
    """One row of ``field_nodes``: what a restart needs to place a node before its birth arrives."""

    id: str
    position: tuple[float, ...]
    modalities: dict[str, str]  # modality -> feature hash
    node_index: int
    description: str
    bd_seq: int
    from_layout: bool
    layout_position: tuple[float, ...] | None = None  # layout nodes: where the layout had it when it moved


class NodeStore:
    """The ``field_nodes`` table of one SQLite file; thread-safe (one connection under a lock).

    Args:
        path: the aggregator's database file (created with its parent folders when missing), or
            ``":memory:"``.
        busy_timeout_s: how long a write waits for the result store's transaction to finish. Its
            transactions are one batch insert, so this is rarely more than milliseconds.
        clock_ns: wall clock for ``updated_ns`` (injectable for tests).

    Raises:
        AggregatorError: the file cannot be opened or created, or is not a database.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 2.0,
                 clock_ns: Callable[[], int] = time.time_ns):
        self.path = str(path)
        self.failures = 0  # writes that failed (logged); the registry in memory was still updated
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: every write below is one explicit statement, committed at once.
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise AggregatorError(f"node store {self.path}: cannot open or create: {exc}") from exc
        try:
            # WAL like the result store (the mode belongs to the file, so both connections agree).
            # synchronous=FULL is per connection: a birth is rare and the table tiny, so an fsync per
            # write costs nothing, and a power cut must not forget where a node went.
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            self._conn = None
            raise AggregatorError(f"node store {self.path}: cannot use it as a database: {exc}") from exc

    # ------------------------------------------------------------------ reading (start-up)
    def load(self, site: str) -> list[StoredNode]:
        """The stored nodes of ``site``, oldest change first. A row that does not parse is skipped
        (logged): a bad row must not keep the aggregator from starting.

        Raises:
            AggregatorError: the store is closed or SQLite failed.
        """
        with self._lock:
            conn = self._require()
            try:
                rows = conn.execute(
                    "SELECT node, position, modalities, node_index, description, bd_seq, from_layout, "
                    "layout_position FROM field_nodes WHERE site = ? ORDER BY updated_ns, node",
                    (site,)).fetchall()
            except sqlite3.Error as exc:
                raise AggregatorError(f"node store {self.path}: reading the nodes of {site} failed: {exc}") from exc
        nodes = []
        for row in rows:
            try:
                nodes.append(_parse_row(row))
            except (ValueError, TypeError) as exc:
                log.warning("node store %s: skipping the stored node %r of site %s: %s", self.path, row[0],
                            site, exc)
        return nodes

    # ------------------------------------------------------------------ writing (ingest path: never raises)
    def save(self, site: str, node: StoredNode) -> bool:
        """Insert or replace one node; False (logged, counted) when the write failed."""
        layout_position = None if node.layout_position is None else json.dumps(list(node.layout_position))
        return self._write(f"saving node {node.id}",
                           "INSERT OR REPLACE INTO field_nodes (site, node, position, modalities, node_index, "
                           "description, bd_seq, from_layout, layout_position, updated_ns) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (site, node.id, json.dumps(list(node.position)), json.dumps(node.modalities),
                            node.node_index, node.description, node.bd_seq, int(node.from_layout),
                            layout_position, int(self._clock_ns())))

    def delete(self, site: str, node_id: str) -> bool:
        """Forget one node (back at its layout place, or refused); False (logged, counted) on failure."""
        return self._write(f"deleting node {node_id}", "DELETE FROM field_nodes WHERE site = ? AND node = ?",
                           (site, node_id))

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ internals
    def _write(self, what: str, sql: str, parameters: tuple) -> bool:
        with self._lock:
            try:
                self._require().execute(sql, parameters)
                return True
            except (sqlite3.Error, AggregatorError) as exc:
                # Disk full, I/O error, locked past the timeout, closed: the registry in memory is
                # right, only a restart would miss this change. Never raise into the ingest path.
                self.failures += 1
                log.error("node store %s: %s failed (%d failed writes so far): %s", self.path, what,
                          self.failures, exc)
                return False

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AggregatorError(f"node store {self.path}: closed")
        return self._conn


def _parse_row(row: tuple) -> StoredNode:
    """A StoredNode from one row; ValueError/TypeError naming what is wrong."""
    node, position, modalities, node_index, description, bd_seq, from_layout, layout_position = row
    return StoredNode(id=str(node), position=_position(position), modalities=_modalities(modalities),
                      node_index=int(node_index), description=str(description), bd_seq=int(bd_seq),
                      from_layout=bool(from_layout),
                      layout_position=None if layout_position is None else _position(layout_position))


def _position(text: str) -> tuple[float, ...]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(is_finite_number(v) for v in value):
        raise ValueError(f"position {text[:100]!r} is not a list of finite numbers")
    return tuple(float(v) for v in value)


def _modalities(text: str) -> dict[str, str]:
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"modalities {text[:100]!r} is not an object of feature hashes")
    return dict(value)
