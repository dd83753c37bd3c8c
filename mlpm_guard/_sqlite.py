"""The SQLite plumbing of the on-disk caches (hidden states, evaluation results): one file, one
table keyed by ``key``, opened per operation so that several processes can share it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Keys per ``IN (...)`` query: SQLite caps the parameters of one statement (999 in older builds).
_CHUNK = 500


class SqliteStore:
    """One table in one SQLite file; subclasses set :attr:`table` and :attr:`schema`."""

    table: str
    schema: str

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute(self.schema)
            db.commit()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        # A long timeout and WAL: a run may read while another process writes the same cache.
        db = sqlite3.connect(self.path, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    def select_keys(self, keys: Sequence[str], columns: str, *, where: str = "",
                    params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """Rows whose ``key`` is in ``keys`` (``AND where``, with ``params``), queried in chunks."""
        with self.connect() as db:
            for start in range(0, len(keys), _CHUNK):
                part = list(keys[start:start + _CHUNK])
                marks = ",".join("?" * len(part))
                condition = f"key IN ({marks})" + (f" AND {where}" if where else "")
                yield from db.execute(f"SELECT {columns} FROM {self.table} WHERE {condition}", [*part, *params])

    def write(self, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run ``statement`` for each row, in one transaction."""
        with self.connect() as db:
            db.executemany(statement, rows)
            db.commit()

    def __len__(self) -> int:
        with self.connect() as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0])
