"""The decision log: every guard decision written to a database, off the request path.

A request only puts a small row on a bounded queue (:meth:`DecisionLog.record`); one background
thread writes the rows in batches through SQLAlchemy. SQLite is the default (a file, no set-up);
any SQLAlchemy URL works, so several replicas can share one PostgreSQL log. A full queue, a locked
database or a full disk never fails or slows a request: the rows are dropped and counted
(:attr:`DecisionLog.stats`).

What is kept of a prompt: always a SHA-256 of its text (so repeats can be grouped and a correction
matched), the text itself only when the operator opts in (``store_text``). Rows older than
``retention_days`` are deleted by the writer.

The same database holds the reviewers' corrections (:class:`Correction`), which
:mod:`mlpm_guard.estimator.prototype_store` teaches to the prototypes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..vocabulary.types import Decision, Route

logger = logging.getLogger(__name__)

__all__ = ["Correction", "DecisionFilter", "DecisionLog", "DecisionLogSettings", "LogStats", "LoggedDecision",
           "database_url", "policy_id", "prompt_text", "text_sha256"]

Kind = Literal["request", "content"]

_metadata = sa.MetaData()
decisions_table = sa.Table(
    "mlpm_guard_decisions", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False, index=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("route", sa.String(16), nullable=False, index=True),
    sa.Column("applied_route", sa.String(16), nullable=False),
    sa.Column("blocked", sa.Boolean, nullable=False),
    sa.Column("p_unsafe", sa.Float, nullable=True, index=True),
    sa.Column("tier", sa.String(16), nullable=True),
    sa.Column("category", sa.String(64), nullable=True, index=True),
    sa.Column("view", sa.String(64), nullable=True),
    sa.Column("output_p_unsafe", sa.Float, nullable=True),
    sa.Column("output_flagged", sa.Boolean, nullable=False),
    sa.Column("error", sa.String(64), nullable=True),
    sa.Column("policy", sa.String(64), nullable=True),
    sa.Column("prototypes_version", sa.String(64), nullable=True),
    sa.Column("text_sha256", sa.String(64), nullable=False, index=True),
    sa.Column("text", sa.Text, nullable=True),
)
corrections_table = sa.Table(
    "mlpm_guard_corrections", _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("decision_id", sa.Integer, nullable=True),
    sa.Column("text_sha256", sa.String(64), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("label", sa.String(8), nullable=False),
    sa.Column("category", sa.String(64), nullable=True),
    sa.Column("applied_version", sa.String(64), nullable=True),
)


class DecisionLogSettings(BaseModel):
    """Where and how decisions are logged.

    Attributes:
        url: a SQLAlchemy URL (``postgresql+psycopg://...``) or a file path, read as SQLite.
        store_text: keep the prompt's text (off: only its SHA-256 is kept). Reviewers can then
            teach a decision with one click; without it they paste the text they want to teach.
        retention_days: rows older than this are deleted (``None``: kept forever).
        max_queue: rows waiting to be written; beyond it new rows are dropped and counted.
        batch_size: most rows written in one transaction.
        max_text_chars: longest text kept (longer texts are cut; the hash is of the whole text).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "mlpm-guard-decisions.db"
    store_text: bool = False
    retention_days: float | None = Field(default=30.0, gt=0)
    max_queue: int = Field(default=10_000, ge=1)
    batch_size: int = Field(default=256, ge=1)
    max_text_chars: int = Field(default=8_000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("`url` is empty; give a SQLAlchemy URL or a SQLite file path")
        return value


def database_url(url_or_path: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a plain path (a path is a SQLite file)."""
    text = str(url_or_path)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().absolute()}"


class LoggedDecision(BaseModel):
    """One row of the log, as read back."""

    model_config = ConfigDict(frozen=True)

    id: int
    time: float
    source: str
    stage: str
    kind: str
    route: Route
    applied_route: Route
    blocked: bool
    p_unsafe: float | None
    tier: str | None
    category: str | None
    view: str | None
    output_p_unsafe: float | None
    output_flagged: bool
    error: str | None
    policy: str | None
    prototypes_version: str | None
    text_sha256: str
    text: str | None


class Correction(BaseModel):
    """A reviewer's judgement of one text: it was fine (``safe``) or harmful (``unsafe``, maybe with a category)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int | None = None
    time: float = Field(default_factory=time.time)
    decision_id: int | None = None
    text: str = Field(min_length=1)
    label: Literal["safe", "unsafe"]
    category: str | None = None
    applied_version: str | None = None

    @property
    def text_sha256(self) -> str:
        return text_sha256(self.text)


class DecisionFilter(BaseModel):
    """Which rows :meth:`DecisionLog.decisions` returns (every field optional)."""

    model_config = ConfigDict(extra="forbid")

    route: Route | None = None
    category: str | None = None
    min_p_unsafe: float | None = Field(default=None, ge=0, le=1)
    max_p_unsafe: float | None = Field(default=None, ge=0, le=1)
    since: float | None = None
    until: float | None = None
    kind: str | None = None
    text_sha256: str | None = None
    limit: int = Field(default=200, ge=1, le=100_000)


@dataclass
class LogStats:
    """What happened to the rows handed to the log since it opened."""

    recorded: int = 0
    written: int = 0
    dropped: int = 0  # the queue was full
    failed: int = 0  # the database refused the write (locked, full disk, gone)
    pruned: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"recorded": self.recorded, "written": self.written, "dropped": self.dropped, "failed": self.failed,
                "pruned": self.pruned, "queued": self.recorded - self.written - self.dropped - self.failed}


def prompt_text(prompt: Any) -> str:
    """The text of a prompt as the log keeps and hashes it: a plain string for one user turn,
    else the messages as compact JSON (so a conversation reads back as one)."""
    if isinstance(prompt, str):
        return prompt
    messages = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} if isinstance(m, dict)
                else {"role": str(getattr(m, "role", getattr(m, "type", ""))), "content": str(getattr(m, "content", ""))}
                for m in prompt]
    if len(messages) == 1 and messages[0]["role"] in ("user", "human"):
        return messages[0]["content"]
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def teachable_prompt(text: str) -> str | list[dict[str, str]]:
    """The prompt :func:`prompt_text` wrote: a message list when it was one."""
    if text.startswith("[{"):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        if isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
            return value
    return text


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_policy_cache: tuple[Any, str] | None = None


def policy_id(policy: Any) -> str | None:
    """A short name for a policy: its preset name, else a digest of its settings."""
    global _policy_cache
    if policy is None:
        return None
    cached = _policy_cache
    if cached is not None and cached[0] is policy:  # the same (frozen) policy object as last time
        return cached[1]
    from .presets import preset_name

    name = preset_name(policy) or "sha256:" + hashlib.sha256(policy.model_dump_json().encode()).hexdigest()[:12]
    _policy_cache = (policy, name)
    return name


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    # WAL: readers (the review page) never block the writer; a killed process leaves committed rows
    # intact. busy_timeout bounds how long the writer thread waits on a lock held elsewhere.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=2000")
    cursor.close()


def create_engine(url: str) -> sa.Engine:
    """A SQLAlchemy engine for a log URL (SQLite files get WAL and a bounded lock wait)."""
    url = database_url(url)
    if url.startswith("sqlite"):
        path = sa.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 2.0})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


_STOP = object()


class DecisionLog:
    """A decision log on one database; :meth:`record` never blocks and never raises.

    Args:
        settings: where and how (or a URL / path, with the other settings at their defaults).
        engine: an engine to use instead of one made from ``settings.url`` (tests, shared pools).

    Example:
        >>> log = DecisionLog(DecisionLogSettings(url="decisions.db", store_text=True))   # doctest: +SKIP
        >>> guard = Guard(decision_log=log)                                              # doctest: +SKIP
    """

    def __init__(self, settings: DecisionLogSettings | str | Path | None = None, *,
                 engine: sa.Engine | None = None) -> None:
        if settings is None or isinstance(settings, (str, Path)):
            settings = DecisionLogSettings() if settings is None else DecisionLogSettings(url=str(settings))
        self.settings = settings
        self.engine = engine if engine is not None else create_engine(settings.url)
        _metadata.create_all(self.engine)
        self.stats = LogStats()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.max_queue)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._last_warning = 0.0
        self._closed = False
        self._next_prune = 0.0
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._thread = threading.Thread(target=self._run, name="mlpm-guard-decision-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ writing (request path)
    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(row)`` with every row recorded, on the request's thread (metrics, traces).
        It must be quick; an error in it is logged and ignored."""
        self._listeners.append(listener)

    def record(self, decision: Decision, prompt: Any, *, kind: Kind = "request", source: str = "guard",
               policy: Any = None, prototypes_version: str | None = None) -> None:
        """Queue one decision about ``prompt`` (a string or messages). Never blocks, never raises."""
        try:
            text = prompt_text(prompt) if prompt is not None else ""
            row = _row(decision, text, kind=kind, source=source, policy=policy_id(policy),
                       prototypes_version=prototypes_version,
                       keep=text[:self.settings.max_text_chars] if self.settings.store_text else None)
        except Exception:  # noqa: BLE001 - a log must never fail the request it describes
            logger.exception("could not build a decision-log row")
            return
        for listener in self._listeners:
            try:
                listener(row)
            except Exception:  # noqa: BLE001 - a metric must not fail the request either
                logger.exception("a decision-log listener failed")
        with self._lock:
            self.stats.recorded += 1
            if self._closed:
                self.stats.dropped += 1
                return
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1

    def record_many(self, decisions: Sequence[Decision], prompts: Sequence[Any], **kwargs: Any) -> None:
        for decision, prompt in zip(decisions, prompts):
            self.record(decision, prompt, **kwargs)

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            rows = [item]
            stop = False
            while len(rows) < self.settings.batch_size:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                rows.append(more)
            with self._lock:
                self._busy += 1
            try:
                self._write(rows)
                self._maybe_prune()
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle.notify_all()
            if stop:
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        try:
            with self.engine.begin() as db:
                db.execute(decisions_table.insert(), rows)
        except Exception as exc:  # noqa: BLE001 - locked, full, gone: count it and carry on
            with self._lock:
                self.stats.failed += len(rows)
            self._warn(f"decision log: {len(rows)} row(s) not written: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.stats.written += len(rows)

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if self.settings.retention_days is None or now < self._next_prune:
            return
        self._next_prune = now + 600.0
        try:
            removed = self.prune()
        except Exception as exc:  # noqa: BLE001
            self._warn(f"decision log: pruning failed: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.stats.pruned += removed

    def _warn(self, message: str) -> None:
        # At most one warning a minute: a full disk would otherwise flood the log it cannot write.
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning(message)

    def prune(self, *, now: float | None = None) -> int:
        """Delete rows older than ``retention_days``; returns how many went."""
        if self.settings.retention_days is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.settings.retention_days * 86400.0
        with self.engine.begin() as db:
            return int(db.execute(decisions_table.delete().where(decisions_table.c.time < cutoff)).rowcount or 0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued row is written or dropped; False if ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while not self._queue.empty() or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.02))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (waiting at most ``timeout``) and stop the writer."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.flush(timeout)
        try:
            self._queue.put(_STOP, timeout=1.0)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self.engine.dispose()

    # ------------------------------------------------------------------ reading (review, calibration)
    def decisions(self, where: DecisionFilter | None = None) -> list[LoggedDecision]:
        """The newest rows matching ``where``, newest first."""
        where = where or DecisionFilter()
        t = decisions_table
        query = sa.select(t).order_by(t.c.time.desc(), t.c.id.desc()).limit(where.limit)
        for clause in _conditions(where):
            query = query.where(clause)
        with self.engine.connect() as db:
            return [LoggedDecision(**row._mapping) for row in db.execute(query)]

    def get(self, decision_id: int) -> LoggedDecision | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(decisions_table).where(decisions_table.c.id == decision_id)).first()
        return LoggedDecision(**row._mapping) if row is not None else None

    def scores(self, where: DecisionFilter | None = None) -> list[tuple[float, float]]:
        """(time, P(unsafe)) of every scored row matching ``where`` (no limit), oldest first."""
        where = where or DecisionFilter(limit=100_000)
        t = decisions_table
        query = sa.select(t.c.time, t.c.p_unsafe).where(t.c.p_unsafe.is_not(None)).order_by(t.c.time)
        for clause in _conditions(where):
            query = query.where(clause)
        with self.engine.connect() as db:
            return [(float(a), float(b)) for a, b in db.execute(query)]

    # ------------------------------------------------------------------ corrections
    def add_correction(self, correction: Correction) -> Correction:
        """Store a correction (synchronously: a reviewer waits for it); returns it with its id."""
        values = correction.model_dump(exclude={"id"})
        values["text_sha256"] = correction.text_sha256
        with self.engine.begin() as db:
            new_id = db.execute(corrections_table.insert().values(**values)).inserted_primary_key[0]
        return correction.model_copy(update={"id": int(new_id)})

    def corrections(self, *, pending: bool | None = None) -> list[Correction]:
        """Corrections, oldest first; ``pending``: only those not yet applied (or only applied ones)."""
        t = corrections_table
        query = sa.select(t).order_by(t.c.id)
        if pending is not None:
            query = query.where(t.c.applied_version.is_(None) if pending else t.c.applied_version.is_not(None))
        with self.engine.connect() as db:
            return [Correction(**{k: v for k, v in row._mapping.items() if k != "text_sha256"})
                    for row in db.execute(query)]

    def mark_applied(self, ids: Iterable[int], version: str) -> None:
        ids = list(ids)
        if not ids:
            return
        with self.engine.begin() as db:
            db.execute(corrections_table.update().where(corrections_table.c.id.in_(ids))
                       .values(applied_version=version))

    def delete_correction(self, correction_id: int) -> bool:
        """Remove a correction that is not applied yet; False if there was none such."""
        t = corrections_table
        with self.engine.begin() as db:
            gone = db.execute(t.delete().where(t.c.id == correction_id, t.c.applied_version.is_(None))).rowcount
        return bool(gone)

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DecisionLog({self.engine.url.render_as_string(hide_password=True)!r}, store_text={self.settings.store_text})"


def _conditions(where: DecisionFilter) -> list[Any]:
    t = decisions_table
    out: list[Any] = []
    if where.route is not None:
        out.append(t.c.route == where.route.value)
    if where.category is not None:
        out.append(t.c.category == where.category)
    if where.min_p_unsafe is not None:
        out.append(t.c.p_unsafe >= where.min_p_unsafe)
    if where.max_p_unsafe is not None:
        out.append(t.c.p_unsafe <= where.max_p_unsafe)
    if where.since is not None:
        out.append(t.c.time >= where.since)
    if where.until is not None:
        out.append(t.c.time <= where.until)
    if where.kind is not None:
        out.append(t.c.kind == where.kind)
    if where.text_sha256 is not None:
        out.append(t.c.text_sha256 == where.text_sha256)
    return out


def _row(decision: Decision, text: str, *, kind: str, source: str, policy: str | None,
         prototypes_version: str | None, keep: str | None) -> dict[str, Any]:
    v, o = decision.verdict, decision.output_verdict
    error = decision.error.split(":", 1)[0].strip()[:64] or "error" if decision.error else None
    return {"time": time.time(), "source": source[:32], "stage": decision.stage[:16], "kind": kind,
            "route": decision.route.value, "applied_route": (decision.applied_route or decision.route).value,
            "blocked": bool(decision.blocked), "p_unsafe": float(v.p_unsafe) if v is not None else None,
            "tier": v.tier.value if v is not None else None,
            "category": v.category[:64] if v is not None and v.category else None,
            "view": v.view[:64] if v is not None and v.view else None,
            "output_p_unsafe": float(o.p_unsafe) if o is not None else None,
            "output_flagged": decision.output_flagged, "error": error, "policy": policy,
            "prototypes_version": prototypes_version, "text_sha256": text_sha256(text), "text": keep}


def verdict_decision(verdict: Any, policy: Any) -> Decision:
    """The decision a check took: the policy's route for the verdict (no answer was generated)."""
    route = policy.route(verdict)
    return Decision(route, blocked=route is Route.REFUSE, verdict=verdict)
