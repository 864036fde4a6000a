"""The result store: one SQLite file of named runs, their measurements and their measurement blocks.

Tables:

- ``runs``: one row per ``trt-prune bench run``: unique ``name``, UTC time, git commit, suite name and the
  suite as JSON, the environment fingerprint (versions, CPU/GPU, threads) as JSON;
- ``results``: one row per (run, entry, variant, backend, batch): p50 / p99 / mean latency, images/s, accuracy
  (mAP points) where known, the per-layer profile (a ProfileResult dict without samples) and the
  session's environment, as JSON;
- ``blocks``: one row per measurement block of a result: its index (the interleaved round), its samples
  (ms, JSON) and their median.

SQLite because it is one file, in the standard library, and safe to append to from one writer; JSON columns
keep the schema stable while profiles grow fields. Every write of a run is one transaction: a run that fails
half-way leaves nothing behind.

The layout has a version, :data:`SCHEMA_VERSION`, kept in SQLite's ``PRAGMA user_version``. Stores written
before the version existed have ``user_version`` 0; when their tables are these, they are version 1 and get
stamped as such on their next write. A store of a newer version, a file that is not SQLite and an SQLite
database without these tables each fail with one :class:`~trt_prune.errors.BenchError` line saying what was
found and what to do.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_prune.errors import BenchError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created TEXT NOT NULL, git_commit TEXT,
    suite TEXT, suite_json TEXT, env_json TEXT);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    entry TEXT NOT NULL, variant TEXT NOT NULL, backend TEXT NOT NULL, batch INTEGER NOT NULL,
    p50_ms REAL, p99_ms REAL, mean_ms REAL, images_s REAL, accuracy REAL, accuracy_metric TEXT,
    profile_json TEXT, env_json TEXT,
    UNIQUE (run_id, entry, variant, backend, batch));
CREATE TABLE IF NOT EXISTS blocks (
    result_id INTEGER NOT NULL REFERENCES results(id) ON DELETE CASCADE, block INTEGER NOT NULL,
    samples_json TEXT NOT NULL, median_ms REAL NOT NULL, PRIMARY KEY (result_id, block));
"""
SCHEMA_VERSION = 1  # PRAGMA user_version of the layout above; 0 is a store from before versions (the same layout)
COLUMNS = {
    "runs": {"id", "name", "created", "git_commit", "suite", "suite_json", "env_json"},
    "results": {"id", "run_id", "entry", "variant", "backend", "batch", "p50_ms", "p99_ms", "mean_ms", "images_s",
                "accuracy", "accuracy_metric", "profile_json", "env_json"},
    "blocks": {"result_id", "block", "samples_json", "median_ms"},
}
SQLITE_HEADER = b"SQLite format 3\x00"
NEW_STORE = "give the path of a store written by 'trt-prune bench run', or a new file name for a new store"


@dataclass
class Result:
    """One stored measurement with its blocks."""

    run: str
    created: str
    commit: str | None
    entry: str
    variant: str
    backend: str
    batch: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    images_s: float
    accuracy: float | None
    profile: dict[str, Any]
    env: dict[str, Any]
    blocks: list[list[float]]

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.entry, self.variant, self.backend, self.batch)


class Store:
    """A result store at ``path`` (created on first write)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        if not write and not self.path.is_file():
            raise BenchError(f"result store {str(self.path)!r} does not exist; record a run first "
                             "(trt-prune bench run SUITE --store ...)")
        self._check_header()
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise BenchError(f"cannot open the result store {str(self.path)!r}: {exc}") from exc
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            self._check_schema(conn, write)
            yield conn
            conn.commit()
        except sqlite3.DatabaseError as exc:
            conn.rollback()
            raise BenchError(f"result store {str(self.path)!r} is not usable ({exc}); is it a trt-prune bench "
                             "store? If it is, it is damaged: restore it from a copy") from exc
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def _check_header(self) -> None:
        """A file that is there but not SQLite fails here, by name, before SQLite's 'file is not a database'."""
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise BenchError(f"result store {str(self.path)!r} is not a file; {NEW_STORE}")
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise BenchError(f"cannot read the result store {str(self.path)!r} ({exc.strerror or exc})") from exc
        if head and head != SQLITE_HEADER:  # an empty file is an empty database to SQLite: a new store
            raise BenchError(f"result store {str(self.path)!r} is not an SQLite database (it starts with "
                             f"{head[:12]!r}); {NEW_STORE}")

    def _check_schema(self, conn: sqlite3.Connection, write: bool) -> None:
        """Create the tables in a new database; accept this layout (version 0 or :data:`SCHEMA_VERSION`); refuse
        anything else with what was found and what to do."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and version == 0:  # a new (or empty) database: lay it out
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        ours = {name: {r[1] for r in conn.execute(f"PRAGMA table_info({name})")} for name in COLUMNS}
        wrong = [name for name, cols in COLUMNS.items() if not cols <= ours[name]]
        if wrong and not tables & set(COLUMNS):
            raise BenchError(f"{str(self.path)!r} is an SQLite database but not a trt-prune result store (its tables "
                             f"are {sorted(tables)[:8]}; a store has {sorted(COLUMNS)}); {NEW_STORE}")
        if version > SCHEMA_VERSION:
            from trt_prune import __version__

            raise BenchError(f"result store {str(self.path)!r} has schema version {version}, written by a newer "
                             f"trt_prune; trt_prune {__version__} reads and writes version {SCHEMA_VERSION}: upgrade "
                             "trt_prune to use it, or record into a new store (--store NEW.sqlite)")
        if version not in (0, SCHEMA_VERSION):
            raise BenchError(f"result store {str(self.path)!r} has schema version {version}, which no trt_prune "
                             f"writes (this one writes {SCHEMA_VERSION}); {NEW_STORE}")
        if wrong:
            missing = {name: sorted(COLUMNS[name] - ours[name]) for name in wrong}
            raise BenchError(f"result store {str(self.path)!r} (schema version {version}) lacks tables or columns "
                             f"{missing}; it is damaged or not a trt-prune store: {NEW_STORE}")
        if version == 0 and write:  # a store from before schema versions: the same layout, now stamped
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def schema_version(self) -> int:
        """The layout version of the store on disk (:data:`SCHEMA_VERSION` for every store this trt_prune can
        read; a store from before versions reads as 1)."""
        with self._connect() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0] or 1

    def run_names(self) -> list[str]:
        if not self.path.is_file():
            return []
        with self._connect() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM runs ORDER BY created, id")]

    def has_run(self, name: str) -> bool:
        return name in self.run_names()

    def add_run(self, name: str, created: str, commit: str | None, suite: str, suite_raw: dict, env: dict,
                results: list[dict[str, Any]]) -> None:
        """Store a run and its results in one transaction; a taken ``name`` is an error."""
        with self._connect(write=True) as conn:
            if conn.execute("SELECT 1 FROM runs WHERE name = ?", (name,)).fetchone():
                raise BenchError(f"the store already has a run named {name!r}; choose another --name")
            # default=str: a suite's YAML may hold dates (name: 2025-05-01), which JSON keeps as text
            run_id = conn.execute(
                "INSERT INTO runs (name, created, git_commit, suite, suite_json, env_json) VALUES (?,?,?,?,?,?)",
                (name, created, commit, suite, json.dumps(suite_raw, default=str), json.dumps(env))).lastrowid
            for r in results:
                result_id = conn.execute(
                    "INSERT INTO results (run_id, entry, variant, backend, batch, p50_ms, p99_ms, mean_ms, "
                    "images_s, accuracy, accuracy_metric, profile_json, env_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (run_id, r["entry"], r["variant"], r["backend"], r["batch"], r["p50_ms"], r["p99_ms"],
                     r["mean_ms"], r["images_s"], r.get("accuracy"), r.get("accuracy_metric"),
                     json.dumps(r.get("profile") or {}), json.dumps(r.get("env") or {}))).lastrowid
                for i, block in enumerate(r["blocks"]):
                    ordered = sorted(block)
                    median = (ordered[len(ordered) // 2] + ordered[(len(ordered) - 1) // 2]) / 2
                    conn.execute("INSERT INTO blocks (result_id, block, samples_json, median_ms) VALUES (?,?,?,?)",
                                 (result_id, i, json.dumps(list(block)), median))

    def results(self, run: str, variant: str | None = None) -> list[Result]:
        """The results of ``run`` (optionally one variant), with their blocks; an unknown name lists the known."""
        with self._connect() as conn:
            row = conn.execute("SELECT id, created, git_commit FROM runs WHERE name = ?", (run,)).fetchone()
            if row is None:
                known = [r[0] for r in conn.execute("SELECT name FROM runs ORDER BY created, id")]
                raise BenchError(f"no run named {run!r} in {str(self.path)!r}; runs: {known or 'none'}")
            run_id, created, commit = row
            query = ("SELECT id, entry, variant, backend, batch, p50_ms, p99_ms, mean_ms, images_s, accuracy, "
                     "profile_json, env_json FROM results WHERE run_id = ?")
            args: tuple = (run_id,)
            if variant is not None:
                query += " AND variant = ?"
                args += (variant,)
            out = []
            for rid, entry, var, backend, batch, p50, p99, mean, ips, acc, prof, env in conn.execute(query, args):
                where = f"result {rid} ({entry} / {var} / {backend} / batch {batch}) of run {run!r}"
                blocks = [self._json(b[0], f"a block of {where}", list) for b in conn.execute(
                    "SELECT samples_json FROM blocks WHERE result_id = ? ORDER BY block", (rid,))]
                out.append(Result(run, created, commit, entry, var, backend, batch, p50, p99, mean, ips, acc,
                                  self._json(prof or "{}", f"the profile of {where}", dict),
                                  self._json(env or "{}", f"the environment of {where}", dict), blocks))
            if variant is not None and not out:
                variants = sorted({r[0] for r in conn.execute(
                    "SELECT DISTINCT variant FROM results WHERE run_id = ?", (run_id,))})
                raise BenchError(f"run {run!r} has no variant {variant!r}; it has {variants}")
            return out

    def _json(self, text: Any, what: str, kind: type) -> Any:
        """A JSON column read back; a damaged one names the row instead of failing as a JSONDecodeError."""
        try:
            value = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise BenchError(f"result store {str(self.path)!r}: {what} is not readable JSON ({exc}); the store is "
                             "damaged: restore it from a copy or record the run again") from exc
        if not isinstance(value, kind):
            raise BenchError(f"result store {str(self.path)!r}: {what} is a {type(value).__name__}, expected a "
                             f"{kind.__name__}; the store is damaged: restore it from a copy or record the run again")
        return value

    def history(self, entry: str | None = None) -> list[dict[str, Any]]:
        """Every stored result (no blocks), oldest first: the data of the history plot. ``machine`` is the GPU
        (else CPU) the result was measured on, from its environment fingerprint."""
        with self._connect() as conn:
            query = ("SELECT runs.name, runs.created, runs.git_commit, entry, variant, backend, batch, p50_ms, "
                     "p99_ms, images_s, accuracy, results.env_json FROM results JOIN runs ON runs.id = results.run_id")
            args: tuple = ()
            if entry is not None:
                query += " WHERE entry = ?"
                args = (entry,)
            keys = ("run", "created", "commit", "entry", "variant", "backend", "batch", "p50_ms", "p99_ms",
                    "images_s", "accuracy")
            out = []
            for row in conn.execute(query + " ORDER BY runs.created, runs.id", args):
                item = dict(zip(keys, row[:-1], strict=True))
                env = self._json(row[-1] or "{}", f"the environment of a result of run {row[0]!r}", dict)
                item["machine"] = env.get("gpu") or env.get("cpu")
                out.append(item)
            return out
