"""The durable trajectory store: SQLite in WAL mode, written by one thread in group
commits.

The trajectory state lives in memory (queue_index.py, state.py) and every change to
it is appended here, in order, as an operation (store.py states the interface). One
writer thread owns the SQLite connection: it takes every operation waiting, applies
them in one transaction and commits, so a burst of concurrent submissions costs one commit, not one each. A
caller that must not answer before its change is durable (a 200 on /scored_data, a
batch handed out) awaits `sync()`, which resolves once the writer has committed
everything appended before the call. The event loop never touches SQLite after
startup.

Durability: WAL with `synchronous=NORMAL`. A commit is in the WAL file (the OS page
cache) before `sync()` resolves, so a killed process (kill -9, OOM, a crash) loses
nothing acknowledged; the WAL is fsynced at checkpoints, so a power loss or kernel
crash may lose the last moments. `synchronous=FULL` (setting `store_fsync`) closes
that window at the price of an fsync per group commit.

Delivery: a batch is handed out at most once. The transaction that records it as
handed out (its group ids in `handed`, a few bytes) also records the step, and it
commits before the batch is sent; a crash between the commit and the send loses that
batch (the trainer asks again and gets the next one) rather than sending it twice
after a restart. At-least-once would need the trainer to acknowledge batches, which
neither Atropos' /batch nor its trainers do. Deleting the groups' rows (tens of KB
each, freeing their overflow pages) is the expensive part, so it is left to the
writer's next transaction, which nobody waits for; a restart finishes whatever a
crash left of it before reading the groups.

Batches handed out over a StreamBatches stream that acknowledges them (its trainer
checkpoints, see acknowledged.py) are kept instead: the transaction that hands one out
records its group ids under its step in `kept`, the groups stay, and a later
transaction (the trainer's checkpoint holds the step) deletes the `kept` row and
records the ids in `handed` together.

Memory: SQLite's heap stays under MEMORY_CAP_BYTES (8 MiB): a 2 MiB page cache for
the writer (CACHE_KIB, explicit), a small one for the checkpointer, and a fixed set of
prepared statements (multi-row statements take a power of two rows, see
MAX_ROWS_PER_STATEMENT). `/metrics` shows it (`clotho_gateway_store_sqlite_bytes`) and
the WAL's size on disk (`clotho_gateway_store_wal_bytes`).

Tables: `meta` (trainer registration, started flag, step, policy version), `envs`
(registrations), `groups` (every group held: queued, buffered for its env (qpos
NULL) or in a formed batch), `ready` (the batches one /batch call formed to hand
out later, one row per call: their group ids, batch by batch; a batch handed out is
deleted from `groups`, and the row goes with the last one) and `handed` (groups
handed out or dropped whose rows are not deleted yet) and `receipts` (the versions of
completions the gateway served, newest `seq` last; trimmed to the receipts' capacity)
and `kept` (batches handed out to an acknowledging trainer and not yet in one of its
checkpoints: step, group ids).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import fcntl
import functools
import itertools
import logging
import os
import queue
import sqlite3
import threading
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition, Unavailable
from services.gateway.trajectory.store import GroupRow, Snapshot, Store

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS envs (env_id INTEGER PRIMARY KEY, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY,
    qpos INTEGER,
    env_id INTEGER,
    size INTEGER NOT NULL,
    versions BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ready (formation INTEGER PRIMARY KEY, batches BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS handed (seq INTEGER PRIMARY KEY, ids BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (seq INTEGER PRIMARY KEY, key INTEGER NOT NULL UNIQUE, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kept (step INTEGER PRIMARY KEY, ids BLOB NOT NULL);
"""
DB_NAME = "trajectories.sqlite3"
LOCK_NAME = "LOCK"
# Operations one transaction takes at most, so that a flood cannot hold a commit back.
MAX_OPS_PER_COMMIT = 20_000
# Seconds between two checkpoints at most once per; and the WAL size kept on disk.
CHECKPOINT_PAUSE_SECONDS = 0.5
# Receipts (nobody waits for them) ride with the next change's commit, or after this
# long when no change comes: every /generate committing its own would write a few
# pages per call for a few rows (and a commit each).
RECEIPT_FLUSH_SECONDS = 0.25
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# SQLite's page cache per connection, KiB (the writer's; SQLite's default is 2000).
# The checkpointer's connection copies WAL frames without its page cache and keeps
# only the schema there.
CACHE_KIB = 2048
CHECKPOINTER_CACHE_KIB = 256
# What SQLite's heap in the gateway stays under (sqlite3_memory_used, the
# `clotho_gateway_store_sqlite_bytes` gauge): the two page caches, the writer's prepared
# statements (a fixed set, at most ~2 MB: see MAX_ROWS_PER_STATEMENT), the schema and
# the WAL bookkeeping. tests/unit/test_gateway_store.py holds the store to it.
MEMORY_CAP_BYTES = 8 * 1024 * 1024


class SqliteStore(Store):
    """Store in `<directory>/trajectories.sqlite3`; one gateway per directory."""

    durable = True

    def __init__(self, directory: str | os.PathLike, fsync: bool = False, receipt_capacity: int = 100_000) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / DB_NAME
        # An advisory lock, released by the kernel when the process dies however it
        # dies: two gateways on one directory would each believe they own the queue.
        self._lock_file = open(self.directory / LOCK_NAME, "a+")  # noqa: SIM115 - held for the store's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise FailedPrecondition(
                f"the store directory {self.directory} is in use by another gateway "
                "(give each gateway its own --data-dir)"
            ) from None
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # Groups are tens of KB: 16 KiB pages need a quarter of the overflow pages of
        # the default 4 KiB (SQLite uses it only when creating the file).
        self._conn.execute("PRAGMA page_size=16384")
        self._conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        # Some builds (Debian's) zero every freed page: a batch handed out would write
        # its whole body again to the WAL before /batch may answer. FAST zeroes only
        # where that costs no extra I/O.
        self._conn.execute("PRAGMA secure_delete=FAST")
        # Checkpoints (copying the WAL into the database, and under NORMAL the only
        # fsyncs) run in their own thread: a commit never waits for one.
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._conn.executescript(SCHEMA)
        # Operations go to the writer a loop iteration's worth at a time: one wakeup
        # of the writer thread per iteration, not one per operation.
        self._ops: queue.SimpleQueue[list[tuple[int, str, tuple[Any, ...]]] | None] = queue.SimpleQueue()
        self._pending: list[tuple[int, str, tuple[Any, ...]]] = []
        self._flush_scheduled = False
        self._lazy_flush: asyncio.TimerHandle | None = None
        self._appended = 0
        self._committed = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._committed_since_checkpoint = threading.Event()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.receipt_capacity = receipt_capacity
        self._loop_thread: int | None = None
        self._closed = False
        self.commits = 0
        self.checkpoints = 0
        self.purges = 0

    @property
    def memory_bytes(self) -> int | None:
        """SQLite's heap in this process (sqlite3_memory_used: every connection's page
        cache, prepared statements and schema); None where it cannot be read."""
        return sqlite_memory_used()

    @property
    def wal_bytes(self) -> int:
        """The size of the write-ahead log on disk (0 when there is none)."""
        try:
            return os.stat(f"{self.path}-wal").st_size
        except OSError:
            return 0

    # -- startup ---------------------------------------------------------------

    def load(self) -> Snapshot:
        c = self._conn
        self._purge()  # what a crash left undeleted of groups already handed out
        return Snapshot(
            meta=dict(c.execute("SELECT key, value FROM meta")),
            envs=list(c.execute("SELECT env_id, record FROM envs ORDER BY env_id")),
            groups=list(c.execute("SELECT id, qpos, env_id, size, versions, body FROM groups ORDER BY id")),
            ready=list(c.execute("SELECT formation, batches FROM ready ORDER BY formation")),
            receipts=list(
                c.execute("SELECT key, version FROM receipts ORDER BY seq DESC LIMIT ?", (self.receipt_capacity,))
            )[::-1],
            kept=[(step, bytes(ids)) for step, ids in c.execute("SELECT step, ids FROM kept ORDER BY step")],
        )

    def start(self) -> None:
        """Start the writer; from now on only it touches the connection."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._flush()  # what was appended before the start (restores, tests)
        self._thread = threading.Thread(target=self._run, name="trajectory-store", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(target=self._checkpoints, name="trajectory-checkpoints", daemon=True)
        self._checkpointer.start()

    async def close(self) -> None:
        """Commit what is pending, stop the writer and close the database."""
        self._closed = True
        if self._thread is not None:
            self._flush()
            self._ops.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._checkpointer is not None:
            self._stopping.set()
            self._committed_since_checkpoint.set()
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        self._conn.close()
        self._lock_file.close()

    # -- appending ---------------------------------------------------------------

    def check(self) -> None:
        if self._failure is not None:
            raise Unavailable(f"the trajectory store failed and accepts no changes: {self._failure}")

    def _append(self, kind: str, *args: Any) -> None:
        loop = self._loop  # set together with _loop_thread
        if loop is not None and self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            # Receipts may be recorded from any thread; the journal is the loop's.
            loop.call_soon_threadsafe(self._append, kind, *args)
            return
        self._appended += 1
        self._pending.append((self._appended, kind, args))
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _append_lazy(self, kind: str, *args: Any) -> None:
        """Append an operation nobody waits for: it goes to the writer with the next
        operation that is flushed at once, or RECEIPT_FLUSH_SECONDS from now (or
        with a `sync()` or `close()`), whichever comes first."""
        loop = self._loop
        if loop is not None and self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._append_lazy, kind, *args)
            return
        self._appended += 1
        self._pending.append((self._appended, kind, args))
        if self._lazy_flush is None and not self._flush_scheduled and loop is not None:
            self._lazy_flush = loop.call_later(RECEIPT_FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._lazy_flush is not None:
            self._lazy_flush.cancel()
            self._lazy_flush = None
        if self._pending:
            pending, self._pending = self._pending, []
            self._ops.put(pending)

    def insert_groups(self, rows: list[GroupRow]) -> None:
        if rows:
            self._append("insert", rows)

    def enqueue_groups(self, moves: list[tuple[int, int]]) -> None:
        if moves:
            self._append("enqueue", moves)

    def form_batches(self, formation: int, batches: bytes) -> None:
        self._append("form", formation, batches)

    def delete_groups(self, ids: list[int], formation: int | None = None) -> None:
        if ids or formation is not None:
            self._append("delete", ids, formation)

    def keep_batch(self, step: int, ids: list[int]) -> None:
        self._append("keep", step, array("q", ids).tobytes())

    def release_batches(self, steps: list[int], ids: list[int]) -> None:
        if steps:
            self._append("release", steps, ids)

    def put_meta(self, key: str, value: bytes) -> None:
        self._append("meta", key, value)

    def put_env(self, env_id: int, record: bytes) -> None:
        self._append("env", env_id, record)

    def put_receipt(self, key: int, version: int) -> None:
        if not self._closed:  # the process-wide receipts may outlive a store (tests)
            self._append_lazy("receipt", key, version)

    def reset(self) -> None:
        self._append("reset")

    async def sync(self) -> None:
        self.check()
        if self._committed >= self._appended:
            return
        if self._thread is None:
            raise Unavailable("the trajectory store is not running")
        if self._lazy_flush is not None:
            self._flush()  # what waits for a timer goes now
        future = asyncio.get_running_loop().create_future()
        # Waiters queue up in the order of the sequence numbers they wait for.
        self._waiters.append((self._appended, future))
        await future

    # -- the writer thread -----------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._ops.get()
            batch: list[tuple[int, str, tuple[Any, ...]]] = []
            if first is None:
                stopping = True
            else:
                batch.extend(first)
            while len(batch) < MAX_OPS_PER_COMMIT:
                try:
                    more = self._ops.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    continue
                batch.extend(more)
            if not batch:
                continue
            try:
                self._commit(batch)
            except BaseException as exc:
                log.exception("trajectory store: commit failed; refusing further changes")
                self._notify(batch[-1][0], exc)
                return
            self._notify(batch[-1][0], None)
            if any(op[1] in ("delete", "release") for op in batch):
                try:
                    self._purge()
                except BaseException as exc:
                    log.exception("trajectory store: purge failed; refusing further changes")
                    self._notify(batch[-1][0], exc)
                    return
            self._committed_since_checkpoint.set()

    def _checkpoints(self) -> None:
        """Copy the WAL into the database now and then, with a connection of its own
        (a PASSIVE checkpoint runs alongside the writer's commits)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA cache_size=-{CHECKPOINTER_CACHE_KIB}")
        try:
            while True:
                self._committed_since_checkpoint.wait()
                if self._stopping.is_set():
                    return
                self._committed_since_checkpoint.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    self.checkpoints += 1
                except sqlite3.Error:
                    log.exception("trajectory store: checkpoint failed (the next one retries)")
                if self._stopping.wait(CHECKPOINT_PAUSE_SECONDS):
                    return
        finally:
            conn.close()

    def _commit(self, batch: list[tuple[int, str, tuple[Any, ...]]]) -> None:
        c = self._conn
        meta: dict[str, bytes] = {}
        receipts = False
        c.execute("BEGIN")
        try:
            # Runs of the same kind go to SQLite as one multi-row statement: the
            # sqlite3 module gives the GIL up and takes it back around every statement
            # step, and taking it back from a busy event loop can take a switch
            # interval (5 ms) each time. Order between kinds is kept.
            for kind, run in _runs(batch):
                if kind == "insert":
                    _many_rows(c, "INSERT INTO groups VALUES ", 6, [v for args in run for row in args[0] for v in row])
                elif kind == "enqueue":
                    c.executemany("UPDATE groups SET qpos = ? WHERE id = ?", [m for args in run for m in args[0]])
                elif kind == "form":
                    c.executemany("INSERT INTO ready VALUES (?, ?)", run)
                elif kind == "delete":
                    # Recorded now, deleted by the purge after this commit.
                    ids = [i for args in run for i in args[0]]
                    if ids:
                        c.execute("INSERT INTO handed (ids) VALUES (?)", (array("q", ids).tobytes(),))
                    _delete_ids(c, "ready", "formation", [args[1] for args in run if args[1] is not None])
                elif kind == "keep":
                    c.executemany("INSERT OR REPLACE INTO kept VALUES (?, ?)", run)
                elif kind == "release":
                    # The kept rows and the handed record of their groups in one
                    # statement group: a crash leaves either both or neither.
                    _delete_ids(c, "kept", "step", [step for args in run for step in args[0]])
                    ids = [i for args in run for i in args[1]]
                    if ids:
                        c.execute("INSERT INTO handed (ids) VALUES (?)", (array("q", ids).tobytes(),))
                elif kind == "meta":
                    # Only the last value of a key in a transaction matters (the
                    # step changes with every batch).
                    meta.update(args for args in run)
                elif kind == "env":
                    c.executemany("INSERT OR REPLACE INTO envs VALUES (?, ?)", run)
                elif kind == "receipt":
                    # A key recorded again moves to the newest end (a new seq).
                    c.executemany("INSERT OR REPLACE INTO receipts (key, version) VALUES (?, ?)", run)
                    receipts = True
                elif kind == "reset":
                    c.execute("DELETE FROM groups")
                    c.execute("DELETE FROM ready")
                    c.execute("DELETE FROM envs")
                    c.execute("DELETE FROM handed")
                    c.execute("DELETE FROM kept")
                else:  # pragma: no cover - a programming error
                    raise ValueError(f"unknown store operation {kind!r}")
            if meta:
                _many_rows(c, "INSERT OR REPLACE INTO meta VALUES ", 2, [v for item in meta.items() for v in item])
            if receipts:
                # Keep the newest `receipt_capacity` (seq grows by one per insert).
                c.execute(
                    "DELETE FROM receipts WHERE seq <= (SELECT max(seq) FROM receipts) - ?", (self.receipt_capacity,)
                )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        self.commits += 1

    def _purge(self) -> None:
        """Delete the rows of groups recorded as handed out (one transaction)."""
        c = self._conn
        handed = list(c.execute("SELECT seq, ids FROM handed"))
        if not handed:
            return
        ids = [i for _, blob in handed for i in array("q", blob)]
        c.execute("BEGIN")
        try:
            _delete_ids(c, "groups", "id", ids)
            c.execute("DELETE FROM handed WHERE seq <= ?", (handed[-1][0],))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        self.purges += 1

    def _notify(self, upto: int, failure: BaseException | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._committed_upto, upto, failure)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _committed_upto(self, upto: int, failure: BaseException | None) -> None:
        """On the event loop: wake the callers whose changes are now durable."""
        if failure is not None:
            self._failure = failure
            error = Unavailable(f"the trajectory store failed: {failure}")
            while self._waiters:
                _, future = self._waiters.popleft()
                if not future.done():
                    future.set_exception(error)
            return
        self._committed = upto
        while self._waiters and self._waiters[0][0] <= upto:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)


@functools.cache
def _sqlite_library() -> Any:
    """The libsqlite3 the sqlite3 module runs on, when it is a shared library this
    process has mapped (dlopen of a mapped path hands back that same library, whose
    counters are the ones that count); None otherwise (a statically linked build, no
    /proc)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libsqlite3" in line and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.sqlite3_memory_used.restype = ctypes.c_int64
            lib.sqlite3_memory_used.argtypes = []
        except (OSError, AttributeError):
            continue
        return lib
    return None


def sqlite_memory_used() -> int | None:
    """Bytes SQLite holds on the heap in this process (None where unreadable)."""
    lib = _sqlite_library()
    return None if lib is None else int(lib.sqlite3_memory_used())


# SQLite's default limit on the parameters of one statement.
MAX_PARAMETERS = 32_000
# Rows one multi-row statement takes at most (powers of two). The sqlite3 module keeps
# every distinct statement text it ran prepared (an LRU of 128), and a prepared
# multi-row statement holds ~650 bytes per row for a group insert, ~190 per id for a
# delete: one text per row count (a commit's row counts vary with the load) filled that
# cache slowly toward 128 statements of up to 3 MB each. Runs are cut into a power of
# two rows per statement instead (`_chunks`: at most log2(max) + 1 statements for a
# short run), so only a fixed, small set of statement texts exists (~2 MB prepared
# at most, inside MEMORY_CAP_BYTES).
MAX_ROWS_PER_STATEMENT = 1024
MAX_IDS_PER_STATEMENT = 4096


def _chunks(n: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, length) pieces of `n` items: `most` at a time, then the rest by
    descending powers of two (`most` is one)."""
    start, size = 0, most
    while start < n:
        while size > n - start:
            size >>= 1
        yield start, size
        start += size


def _many_rows(c: sqlite3.Connection, insert: str, width: int, values: list[Any]) -> None:
    """`insert` + "(?, ...), (?, ...)": every row in a few statements of a power of
    two rows each."""
    row = "(" + ",".join("?" * width) + ")"
    for start, rows in _chunks(len(values) // width, MAX_ROWS_PER_STATEMENT):
        c.execute(insert + ",".join([row] * rows), values[start * width : (start + rows) * width])


def _delete_ids(c: sqlite3.Connection, table: str, column: str, ids: list[int]) -> None:
    for start, size in _chunks(len(ids), MAX_IDS_PER_STATEMENT):
        c.execute(f"DELETE FROM {table} WHERE {column} IN ({','.join('?' * size)})", ids[start : start + size])


def _runs(batch: list[tuple[int, str, tuple[Any, ...]]]) -> Iterator[tuple[str, list[tuple[Any, ...]]]]:
    """Consecutive operations of the same kind: (kind, [args, ...])."""
    for kind, ops in itertools.groupby(batch, key=lambda op: op[1]):
        yield kind, [op[2] for op in ops]
