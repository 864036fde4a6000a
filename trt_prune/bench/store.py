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
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise BenchError(f"cannot open the result store {str(self.path)!r}: {exc}") from exc
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.executescript(SCHEMA)
            yield conn
            conn.commit()
        except sqlite3.DatabaseError as exc:
            conn.rollback()
            raise BenchError(f"result store {str(self.path)!r} is not usable ({exc}); is it a trt-prune bench "
                             "store?") from exc
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

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
            run_id = conn.execute(
                "INSERT INTO runs (name, created, git_commit, suite, suite_json, env_json) VALUES (?,?,?,?,?,?)",
                (name, created, commit, suite, json.dumps(suite_raw), json.dumps(env))).lastrowid
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
                blocks = [json.loads(b[0]) for b in conn.execute(
                    "SELECT samples_json FROM blocks WHERE result_id = ? ORDER BY block", (rid,))]
                out.append(Result(run, created, commit, entry, var, backend, batch, p50, p99, mean, ips, acc,
                                  json.loads(prof), json.loads(env), blocks))
            if variant is not None and not out:
                variants = sorted({r[0] for r in conn.execute(
                    "SELECT DISTINCT variant FROM results WHERE run_id = ?", (run_id,))})
                raise BenchError(f"run {run!r} has no variant {variant!r}; it has {variants}")
            return out

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
                env = json.loads(row[-1] or "{}")
                item["machine"] = env.get("gpu") or env.get("cpu")
                out.append(item)
            return out
