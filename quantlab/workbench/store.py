"""The results store: one SQLite file (WAL mode), one row per evaluated artifact.

A row is written in one transaction *after* its artifact has been written, reloaded and
evaluated, so the table only ever holds complete results; a sweep killed at any moment leaves at
most an artifact without a row, which the next run redoes. Each row's ``key`` hashes what
determines the result (variant, calibration, evaluation, model content, quantlab and metrics
versions); it is the primary key, so a result is never recorded twice, and a variant whose key is
present is skipped.

Tables: ``runs`` (one per ``quantlab run``: name, config, model, start / end) and ``results``
(key, run, variant, model and calibration hashes, artifact path and format, metrics JSON,
hardware, library versions, stage timings).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from quantlab.errors import QuantlabError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    config_json TEXT NOT NULL,
    config_sha256 TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    run_name TEXT NOT NULL,
    variant TEXT NOT NULL,
    variant_json TEXT NOT NULL,
    model TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    calibration_sha256 TEXT,
    config_sha256 TEXT NOT NULL,
    quantlab_version TEXT NOT NULL,
    artifact TEXT NOT NULL,
    format TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    hardware_json TEXT,
    versions_json TEXT,
    timings_json TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_run ON results(run_id);
CREATE INDEX IF NOT EXISTS results_model ON results(model_sha256);
"""


@dataclass(frozen=True)
class ResultRow:
    """One stored result (metrics parsed back into `quantlab.eval.harness.Metrics`)."""

    key: str
    run_id: int
    run_name: str
    variant: str
    variant_config: dict
    model: str
    model_sha256: str
    calibration_sha256: str | None
    artifact: str
    format: str
    metrics: object
    versions: dict
    timings: dict
    created: float


class ResultStore:
    """Open (and create) the store at ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise QuantlabError(f"results store {self.path}: {exc}") from None
        except OSError as exc:
            raise QuantlabError(f"cannot create the results store {self.path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def run_lock(self, name: str, *, wait: bool = False, log=None):
        """Hold the lock of run ``name`` on this store for the block: a second ``quantlab run``
        of the same run and store stops with one line naming the process that holds it, or with
        ``wait`` waits for it (then finds that run's rows already stored). The lock is an
        ``flock`` on ``<store>.<run>.lock``: the kernel releases it when the holder dies."""
        import fcntl
        import os

        path = self.path.with_name(f"{self.path.name}.{name}.lock")
        fh = open(path, "a+")  # noqa: SIM115 (closed below)
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                if not wait:
                    raise QuantlabError(
                        f"run {name} is already running on {self.path} ({holder}); wait for it "
                        "to finish, or pass --wait"
                    ) from None
                if log is not None:
                    log(f"waiting for run {name} on {self.path} ({holder}) to finish ...")
                fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
            yield
        finally:
            fh.close()  # releases the lock

    def start_run(self, name: str, model: str, config_json: str, config_sha256: str) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO runs (name, model, config_json, config_sha256, started) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, model, config_json, config_sha256, time.time()),
            )
        return int(cur.lastrowid)

    def finish_run(self, run_id: int) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET finished = ? WHERE id = ?", (time.time(), run_id))

    def has(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone() is not None

    def record(
        self,
        *,
        key: str,
        run_id: int,
        run_name: str,
        variant,
        model: str,
        model_sha256: str,
        calibration_sha256: str | None,
        config_sha256: str,
        artifact: str,
        fmt: str,
        metrics,
        versions: dict,
        timings: dict,
    ) -> None:
        """Store one complete result (one transaction; a key already present is an error)."""
        import dataclasses

        from quantlab.version import __version__

        row = (
            key,
            run_id,
            run_name,
            variant.name,
            json.dumps(variant.to_dict()),
            model,
            model_sha256,
            calibration_sha256,
            config_sha256,
            __version__,
            artifact,
            fmt,
            metrics.to_json(),
            json.dumps(dataclasses.asdict(metrics.hardware)),
            json.dumps(versions),
            json.dumps(timings),
            time.time(),
        )
        try:
            with self.db:  # one transaction: the row is there complete, or not at all
                self.db.execute(f"INSERT INTO results VALUES ({', '.join('?' * len(row))})", row)
        except sqlite3.Error as exc:
            raise QuantlabError(f"results store {self.path}: could not record ({exc})") from None

    def runs(self) -> list[dict]:
        cur = self.db.execute(
            "SELECT r.id, r.name, r.model, r.started, r.finished, COUNT(x.key) "
            "FROM runs r LEFT JOIN results x ON x.run_id = r.id GROUP BY r.id ORDER BY r.id"
        )
        keys = ("id", "name", "model", "started", "finished", "results")
        return [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]

    def results(self, *, run_name: str | None = None, model_sha256: str | None = None):
        """Stored rows, oldest first; filtered by run name and/or model hash."""
        from quantlab.eval.harness import Metrics

        query = (
            "SELECT key, run_id, run_name, variant, variant_json, model, model_sha256, "
            "calibration_sha256, artifact, format, metrics_json, versions_json, timings_json, "
            "created FROM results"
        )
        where, args = [], []
        if run_name is not None:
            where.append("run_name = ?")
            args.append(run_name)
        if model_sha256 is not None:
            where.append("model_sha256 = ?")
            args.append(model_sha256)
        if where:
            query += " WHERE " + " AND ".join(where)
        rows = []
        for r in self.db.execute(query + " ORDER BY created", args).fetchall():
            rows.append(
                ResultRow(
                    key=r[0],
                    run_id=r[1],
                    run_name=r[2],
                    variant=r[3],
                    variant_config=json.loads(r[4]),
                    model=r[5],
                    model_sha256=r[6],
                    calibration_sha256=r[7],
                    artifact=r[8],
                    format=r[9],
                    metrics=Metrics.from_json(r[10]),
                    versions=json.loads(r[11] or "{}"),
                    timings=json.loads(r[12] or "{}"),
                    created=r[13],
                )
            )
        return rows
