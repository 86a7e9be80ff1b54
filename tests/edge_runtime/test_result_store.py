"""ResultStore: WAL, idempotent batches, retention, queries, cross-process readers, bad files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import AggregatorError
from edge_runtime.result_store import SCHEMA_VERSION, ResultStore

REPO = Path(__file__).resolve().parents[2]
DAY_NS = 86_400 * 1_000_000_000


class FakeClock:
    """Wall clock in ns and a monotonic clock in s, moved by hand."""

    def __init__(self, ns: int = 1_700_000_000 * 10**9):
        self.ns = ns
        self.mono = 1000.0

    def time_ns(self) -> int:
        return self.ns

    def monotonic(self) -> float:
        return self.mono


def result(site: str = "lot", start: int = 0, present: int = 3, **extra) -> dict:
    return {"site": site, "window_start_ns": start, "nodes_present": present, **extra}


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "results.db"


def test_wal_mode_schema_version_and_index(db):
    with ResultStore(db) as store:
        assert store.journal_mode == "wal"
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(results)")}
        assert {"results_window_start", "results_created"} <= indexes
    finally:
        conn.close()


def test_store_query_round_trip(db):
    clock = FakeClock()
    with ResultStore(db, clock_ns=clock.time_ns, monotonic=clock.monotonic) as store:
        batch = [result(start=10, scores=[0.25, 0.75], label="car"),
                 result(start=20, present=2, position=np.array([1.5, -2.0], dtype=np.float32),
                        confidence=np.float32(0.5), n=np.int64(7))]
        assert store.store(batch) == 2
        rows = store.query(newest_first=False)
    assert [r["window_start_ns"] for r in rows] == [10, 20]
    first, second = rows
    assert first["scores"] == [0.25, 0.75] and first["label"] == "car" and first["nodes_present"] == 3
    assert second["position"] == [1.5, -2.0] and second["confidence"] == 0.5 and second["n"] == 7
    assert first["created_ns"] == clock.ns and isinstance(first["id"], int) and first["id"] != second["id"]
    # Payload is compact JSON.
    conn = sqlite3.connect(db)
    payload = conn.execute("SELECT payload FROM results WHERE window_start_ns = 10").fetchone()[0]
    conn.close()
    assert " " not in payload and json.loads(payload)["label"] == "car"


def test_duplicate_windows_are_ignored(db):
    with ResultStore(db) as store:
        assert store.store([result(start=1), result(start=2)]) == 2
        assert store.store([result(start=1, label="replayed"), result(start=2)]) == 0
        assert store.count() == 2
        # The first write wins: a replay never overwrites what was acknowledged.
        assert "label" not in store.query(since_ns=1, until_ns=2)[0]
        # Same window of another site is a different row; a duplicate inside one batch counts once.
        assert store.store([result(site="other", start=1), result(start=3), result(start=3)]) == 2
        assert store.count() == 4 and store.count("lot") == 3 and store.count("other") == 1
        assert store.store([]) == 0


def test_a_window_assembled_again_with_another_median_start_is_the_same_window(db):
    """After a redelivery the median of the node-stamped starts can move by a node's clock offset;
    within half a window it is still the stored window, and the first result stays."""
    window = 2_000_000_000
    with ResultStore(db) as store:
        assert store.insert_new([result(start=10 * window)], same_window_ns=window // 2) == [True]
        again = [result(start=10 * window + 300_000_000, label="again"), result(start=11 * window)]
        assert store.insert_new(again, same_window_ns=window // 2) == [False, True]
        assert store.count() == 2 and "label" not in store.query()[0]
        # Without a tolerance only the exact start matches (what store() does).
        assert store.insert_new([result(start=10 * window + 1)]) == [True]
        with pytest.raises(AggregatorError, match="same_window_ns"):
            store.insert_new([result(start=1)], same_window_ns=-1)


def test_invalid_results_reject_the_whole_batch(db):
    with ResultStore(db) as store:
        bad = [
            [result(start=1), {"site": "lot", "window_start_ns": 2}],  # nodes_present missing
            [result(start=1), result(start=2.0)],  # float window start
            [result(start=True)],
            [result(site="")],
            [result(present=-1)],
            [result(start=2**63)],
            [result(blob=object())],
            ["not a dict"],
        ]
        for batch in bad:
            with pytest.raises(AggregatorError, match="result #"):
                store.store(batch)  # type: ignore[arg-type]
        assert store.count() == 0


def test_retention_by_rows_drops_oldest_inserted(db):
    clock = FakeClock()
    with ResultStore(db, retention_rows=5, retention_days=None, retention_interval_s=60.0,
                     clock_ns=clock.time_ns, monotonic=clock.monotonic) as store:
        store.store([result(start=i) for i in range(3)])  # first store runs retention: nothing to do
        store.store([result(start=i) for i in range(3, 9)])  # within the interval: no sweep yet
        assert store.count() == 9 and store.deleted_rows == 0
        clock.mono += 61
        store.store([result(start=9)])
        assert store.count() == 5 and store.deleted_rows == 5
        starts = [r["window_start_ns"] for r in store.query(newest_first=False)]
        assert starts == [5, 6, 7, 8, 9]
        # The row limit follows insertion order, not window time: a late, old window stays.
        store.store([result(start=-100)])
        assert store.apply_retention() == 1
        assert [r["window_start_ns"] for r in store.query(newest_first=False)] == [-100, 6, 7, 8, 9]
        assert store.deleted_rows == 6


def test_retention_by_age(db):
    clock = FakeClock()
    with ResultStore(db, retention_rows=None, retention_days=2.0, retention_interval_s=0.0,
                     clock_ns=clock.time_ns, monotonic=clock.monotonic) as store:
        store.store([result(start=1), result(start=2)])
        clock.ns += DAY_NS
        store.store([result(start=3)])
        assert store.count() == 3
        clock.ns += int(1.5 * DAY_NS)  # first two are 2.5 days old, the third 1.5 days
        store.store([result(start=4)])
        assert sorted(r["window_start_ns"] for r in store.query()) == [3, 4]
        assert store.deleted_rows == 2
        clock.ns += 10 * DAY_NS
        assert store.apply_retention() == 2 and store.count() == 0


def test_retention_disabled(db):
    with ResultStore(db, retention_rows=None, retention_days=None, retention_interval_s=0.0) as store:
        store.store([result(start=i) for i in range(50)])
        assert store.apply_retention() == 0 and store.count() == 50


def test_query_filters_and_ordering(db):
    with ResultStore(db) as store:
        store.store([result(site=site, start=start) for site in ("a", "b") for start in (100, 200, 300, 400)])
        newest = store.query(site="a")
        assert [r["window_start_ns"] for r in newest] == [400, 300, 200, 100]
        assert all(r["site"] == "a" for r in newest)
        oldest = store.query(site="b", newest_first=False, limit=2)
        assert [(r["site"], r["window_start_ns"]) for r in oldest] == [("b", 100), ("b", 200)]
        # since inclusive, until exclusive.
        window = store.query(since_ns=200, until_ns=400, newest_first=False)
        assert sorted((r["window_start_ns"], r["site"]) for r in window) == [
            (200, "a"), (200, "b"), (300, "a"), (300, "b")]
        assert [r["window_start_ns"] for r in window] == [200, 200, 300, 300]
        assert len(store.query(limit=3)) == 3
        assert len(store.query(limit=None)) == 8
        assert store.query(limit=0) == []
        assert store.query(site="nowhere") == []
        with pytest.raises(AggregatorError, match="limit"):
            store.query(limit=-1)


def test_other_process_reads_committed_rows_while_store_is_open(db):
    store = ResultStore(db)
    try:
        store.store([result(start=i, label=f"w{i}") for i in range(5)])
        code = (
            "import json, sqlite3, sys\n"
            "from edge_runtime.result_store import ResultStore\n"
            "path = sys.argv[1]\n"
            "conn = sqlite3.connect(path)\n"
            "plain = conn.execute('SELECT COUNT(*) FROM results').fetchone()[0]\n"
            "conn.close()\n"
            "with ResultStore(path, readonly=True) as reader:\n"
            "    rows = reader.query(newest_first=False)\n"
            "print(json.dumps({'plain': plain, 'labels': [r['label'] for r in rows]}))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code, str(db)], cwd=REPO, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout)
        assert seen == {"plain": 5, "labels": ["w0", "w1", "w2", "w3", "w4"]}
        # The writer still works after the other process has come and gone.
        assert store.store([result(start=5)]) == 1
    finally:
        store.close()


def test_readonly_store_refuses_writes_and_missing_files(db, tmp_path):
    with ResultStore(db) as store:
        store.store([result(start=1)])
    with ResultStore(db, readonly=True) as reader:
        assert reader.count() == 1
        with pytest.raises(AggregatorError, match="read-only"):
            reader.store([result(start=2)])
    with pytest.raises(AggregatorError, match="no such database"):
        ResultStore(tmp_path / "missing.db", readonly=True)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(AggregatorError, match="not a result store"):
        ResultStore(empty, readonly=True)


def test_reopen_after_close_keeps_data(db):
    store = ResultStore(db)
    store.store([result(start=1, label="kept")])
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(AggregatorError, match="closed"):
        store.count()
    with pytest.raises(AggregatorError, match="closed"):
        store.store([result(start=2)])
    with ResultStore(db) as again:
        assert again.count() == 1 and again.query()[0]["label"] == "kept"
        assert again.store([result(start=1)]) == 0


def test_integrity_check_ok(db):
    with ResultStore(db) as store:
        store.store([result(start=i) for i in range(100)])
        assert store.integrity_check() == "ok"


def test_not_a_database_raises(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite file, just bytes " * 200)
    with pytest.raises(AggregatorError, match="not a database"):
        ResultStore(junk)


def test_unopenable_path_raises(tmp_path):
    with pytest.raises(AggregatorError, match="cannot open"):
        ResultStore(tmp_path)  # a directory
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AggregatorError, match="cannot open"):
        ResultStore(blocker / "sub" / "results.db")  # parent is a file


def test_creates_parent_folders(tmp_path):
    path = tmp_path / "var" / "lib" / "spar" / "results.db"
    with ResultStore(path) as store:
        assert store.store([result()]) == 1
    assert path.is_file()


def test_newer_schema_is_refused(db):
    ResultStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(AggregatorError, match="newer"):
        ResultStore(db)


def test_bad_arguments():
    with pytest.raises(AggregatorError, match="retention_rows"):
        ResultStore(":memory:", retention_rows=-1)
    with pytest.raises(AggregatorError, match="retention_days"):
        ResultStore(":memory:", retention_days=float("nan"))
    with pytest.raises(AggregatorError, match="synchronous"):
        ResultStore(":memory:", synchronous="OFF")  # type: ignore[arg-type]


def test_concurrent_writer_and_reader_threads(db):
    errors: list[BaseException] = []
    done = threading.Event()
    counts: list[int] = []

    with ResultStore(db, retention_rows=150, retention_interval_s=0.0) as store:
        def writer() -> None:
            try:
                for batch in range(40):
                    store.store([result(start=batch * 10 + i) for i in range(10)])
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
            finally:
                done.set()

        def reader() -> None:
            try:
                # Read at least once: on a loaded machine the writer can finish before a reader
                # is first scheduled, and a reader that never read checks nothing.
                while True:
                    finished = done.is_set()
                    counts.append(store.count())
                    rows = store.query(limit=20)
                    assert all("window_start_ns" in r for r in rows)
                    if finished:
                        break
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        assert store.count() == 150 and store.deleted_rows == 250
        assert counts and max(counts) <= 160 and store.integrity_check() == "ok"


def test_windows_are_told_apart_by_grid_start_not_by_median_start(db):
    """Two different partial windows whose median starts are closer than half a window (node clocks
    off by up to half a window) used to merge: the second was acknowledged but never stored. By grid
    start they are two windows; a redelivered copy (same grid start, other median) is one."""
    window = 2_000_000_000
    with ResultStore(db) as store:
        first = result(start=10 * window + 900_000_000, grid_start_ns=10 * window)
        second = result(start=11 * window - 900_000_000, grid_start_ns=11 * window)  # 200 ms apart
        assert store.insert_new([first, second], window_ns=window) == [True, True]
        again = result(start=10 * window + 100_000_000, grid_start_ns=10 * window, label="again")
        assert store.insert_new([again], window_ns=window) == [False]
        assert store.count() == 2 and all("label" not in r for r in store.query())
        assert store.grid_phase("lot", window) == 0 and store.grid_phase("lot", 2 * window) is None
        with pytest.raises(AggregatorError, match="window_ns"):
            store.insert_new([first], window_ns=0)


def test_the_grid_phase_is_kept_for_the_next_run(db):
    window = 2_000_000_000
    with ResultStore(db) as store:
        store.insert_new([result(start=5 * window + 300, grid_start_ns=5 * window + 300)], window_ns=window)
        store.insert_new([result(start=6 * window + 700, grid_start_ns=6 * window + 700)], window_ns=window)
    with ResultStore(db) as store:
        assert store.grid_phase("lot", window) == 300  # the first grid wins


def test_a_version_1_store_is_migrated_and_keeps_its_rows(db):
    conn = sqlite3.connect(db)
    conn.execute("""CREATE TABLE results (id INTEGER PRIMARY KEY, site TEXT NOT NULL,
                    window_start_ns INTEGER NOT NULL, created_ns INTEGER NOT NULL, nodes_present INTEGER NOT NULL,
                    payload TEXT NOT NULL, UNIQUE (site, window_start_ns))""")
    conn.execute("INSERT INTO results (site, window_start_ns, created_ns, nodes_present, payload) "
                 "VALUES ('lot', 1, 1, 3, '{\"site\": \"lot\"}')")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    with ResultStore(db) as store:
        assert store.count() == 1
        assert store.insert_new([result(start=2, grid_start_ns=2)], window_ns=10) == [True]
        assert store._read("PRAGMA user_version", [])[0][0] == SCHEMA_VERSION == 2


def test_non_finite_outputs_are_refused(db):
    with ResultStore(db) as store, pytest.raises(AggregatorError, match="JSON"):
        store.store([result(start=1, outputs={"logits": [float("nan")]})])
