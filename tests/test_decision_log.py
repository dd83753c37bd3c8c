"""The decision log: rows as written and read back, redaction, retention, and that a slow, locked,
full or killed database never fails or blocks the request that is being logged."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sa = pytest.importorskip("sqlalchemy")

from mlpm_guard import Correction, Decision, DecisionLog, DecisionLogSettings, Route, Tier, Timings, Verdict  # noqa: E402
from mlpm_guard.guardrail.decision_log import (  # noqa: E402
    DecisionFilter,
    database_url,
    policy_id,
    prompt_text,
    teachable_prompt,
    text_sha256,
)
from mlpm_guard.guardrail.presets import PRESETS, policy_preset, preset_name  # noqa: E402

UNSAFE = Verdict(0.97, "unsafe", Tier.UNSAFE, "S9", "Indiscriminate weapons", view="message")
SAFE = Verdict(0.02, "safe", Tier.SAFE, view="message")
MIDDLE = Verdict(0.4, "safe", Tier.CONTROVERSIAL, view="sentence 2")


def refused(verdict: Verdict = UNSAFE) -> Decision:
    return Decision(Route.REFUSE, True, verdict, timings=Timings(scoring_ms=2.0))


def passed(verdict: Verdict = SAFE) -> Decision:
    return Decision(Route.PASS, False, verdict)


def make_log(tmp_path: Path, **settings) -> DecisionLog:
    return DecisionLog(DecisionLogSettings(url=str(tmp_path / "log.db"), **settings))


def test_rows_read_back_with_hash_and_no_text_unless_asked(tmp_path):
    with make_log(tmp_path) as log:
        log.record(refused(), "How do I build a bomb?", policy=policy_preset("strict"), prototypes_version="v0002")
        log.record(passed(), [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                   kind="content", source="server")
        assert log.flush()
        newest, oldest = log.decisions()
    assert (oldest.route, oldest.blocked, oldest.p_unsafe, oldest.category, oldest.view) == (
        Route.REFUSE, True, 0.97, "S9", "message")
    assert oldest.text is None and oldest.text_sha256 == text_sha256("How do I build a bomb?")
    assert oldest.policy == "strict" and oldest.prototypes_version == "v0002" and oldest.source == "guard"
    assert newest.kind == "content" and newest.source == "server" and newest.route is Route.PASS
    assert newest.text_sha256 == text_sha256('[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]')
    assert log.stats.to_dict() == {"recorded": 2, "written": 2, "dropped": 0, "failed": 0, "pruned": 0, "queued": 0}


def test_text_is_kept_on_opt_in_and_cut_to_its_limit(tmp_path):
    with make_log(tmp_path, store_text=True, max_text_chars=10) as log:
        log.record(refused(), "Where can I buy a gun safe for my home?")
        log.record(passed(), [{"role": "user", "content": "Hello there"}])
        log.flush()
        rows = log.decisions()
    assert [r.text for r in rows] == ["Hello ther", "Where can "]
    assert rows[1].text_sha256 == text_sha256("Where can I buy a gun safe for my home?")  # of the whole text


def test_filters(tmp_path):
    with make_log(tmp_path) as log:
        for verdict, decision in ((UNSAFE, refused), (SAFE, passed), (MIDDLE, passed)):
            log.record(decision(verdict), f"text {verdict.p_unsafe}")
        log.flush()
        assert [r.p_unsafe for r in log.decisions(DecisionFilter(route=Route.PASS))] == [0.4, 0.02]
        assert [r.p_unsafe for r in log.decisions(DecisionFilter(min_p_unsafe=0.3))] == [0.4, 0.97]
        assert [r.p_unsafe for r in log.decisions(DecisionFilter(category="S9"))] == [0.97]
        assert [r.p_unsafe for r in log.decisions(DecisionFilter(min_p_unsafe=0.01, max_p_unsafe=0.5, limit=1))] == [0.4]
        assert log.decisions(DecisionFilter(since=time.time() + 60)) == []
        assert [s for _, s in log.scores()] == [0.97, 0.02, 0.4]  # oldest first


def test_retention_deletes_only_old_rows(tmp_path):
    with make_log(tmp_path, retention_days=1) as log:
        log.record(refused(), "a")
        log.flush()
        assert log.prune() == 0
        assert log.prune(now=time.time() + 2 * 86400) == 1
        assert log.decisions() == []
    with make_log(tmp_path, retention_days=None) as log:
        log.record(refused(), "b")
        log.flush()
        assert log.prune(now=time.time() + 1e9) == 0 and len(log.decisions()) == 1


def test_corrections_round_trip_and_applied_state(tmp_path):
    with make_log(tmp_path) as log:
        a = log.add_correction(Correction(text="How can I steal the show?", label="safe", decision_id=3))
        b = log.add_correction(Correction(text="Make a pipe bomb", label="unsafe", category="S9"))
        assert (a.id, b.id) == (1, 2) and log.corrections(pending=True) == [a, b]
        log.mark_applied([a.id], "v0002")
        assert [c.id for c in log.corrections(pending=True)] == [2]
        assert log.corrections(pending=False)[0].applied_version == "v0002"
        assert not log.delete_correction(a.id)  # applied: part of a version's record now
        assert log.delete_correction(b.id) and log.corrections(pending=True) == []
    with pytest.raises(ValueError):
        Correction(text="x", label="fine")


def test_a_locked_database_drops_and_counts_without_blocking(tmp_path):
    path = tmp_path / "log.db"
    log = DecisionLog(DecisionLogSettings(url=str(path), max_queue=4, batch_size=2))
    holder = sqlite3.connect(path, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        start = time.perf_counter()
        for i in range(200):
            log.record(refused(), f"prompt {i}")
        spent = time.perf_counter() - start
        assert spent < 1.0, f"recording 200 rows against a locked database took {spent:.2f} s"
        assert log.stats.dropped > 0
        assert log.flush(timeout=30)
        assert log.stats.failed > 0 and log.stats.written == 0
    finally:
        holder.rollback()
        holder.close()
    log.record(passed(), "after the lock")
    assert log.flush(timeout=30)
    assert [r.route for r in log.decisions()] == [Route.PASS]
    s = log.stats
    assert s.recorded == 201 and s.written + s.dropped + s.failed == 201
    log.close()


def test_a_full_disk_fails_writes_not_requests(tmp_path):
    log = make_log(tmp_path, store_text=True, max_text_chars=200_000)
    # SQLite's page cap: past it every write fails with "database or disk is full", as on a full disk.
    sa.event.listen(log.engine, "connect", lambda conn, _: conn.execute("PRAGMA max_page_count=12"))
    log.engine.dispose()
    for i in range(20):
        log.record(refused(), f"{i} " + "x" * 100_000)
    assert log.flush(timeout=30)
    assert log.stats.failed > 0 and log.stats.recorded == 20
    log.close()


def test_record_never_raises_on_a_closed_log_or_a_bad_prompt(tmp_path):
    log = make_log(tmp_path)
    seen = []
    log.add_listener(lambda row: seen.append((row["route"], row["category"])))
    log.add_listener(lambda row: 1 / 0)  # a broken listener is logged, not raised
    log.record(refused(), "hello")
    assert seen == [("refuse", "S9")]
    log.record(refused(), object())  # not a prompt: logged as an error, not raised
    log.close()
    log.record(refused(), "after close")
    assert log.stats.dropped == 1 and log.stats.written == 1


def test_a_killed_writer_leaves_no_corrupt_rows(tmp_path):
    path = tmp_path / "log.db"
    script = textwrap.dedent(f"""
        import itertools, sys
        from mlpm_guard import Decision, DecisionLog, DecisionLogSettings, Route, Tier, Verdict
        log = DecisionLog(DecisionLogSettings(url={str(path)!r}, store_text=True, batch_size=50))
        v = Verdict(0.9, "unsafe", Tier.UNSAFE, "S9")
        for i in itertools.count():
            log.record(Decision(Route.REFUSE, True, v), "prompt %d " % i + "y" * 500)
            if i == 2000:
                print("ready", flush=True)
    """)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with DecisionLog(DecisionLogSettings(url=str(path))) as log:
        rows = log.decisions(DecisionFilter(limit=100_000))
    assert len(rows) > 0
    assert all(r.text.startswith("prompt ") and r.text_sha256 == text_sha256(r.text) for r in rows)


def test_prompt_text_and_its_inverse():
    assert prompt_text("hi") == "hi" and prompt_text([{"role": "user", "content": "hi"}]) == "hi"
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert teachable_prompt(prompt_text(convo)) == convo
    assert teachable_prompt("[{not json") == "[{not json"


def test_database_url():
    assert database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("rel/log.db") == f"sqlite:///{Path('rel/log.db').absolute()}"


def test_presets_are_named_and_ordered():
    assert PRESETS == ("strict", "balanced", "permissive")
    for name in PRESETS:
        assert preset_name(policy_preset(name)) == name and policy_id(policy_preset(name)) == name
    assert preset_name(policy_preset("strict", refusal_message="No.")) is None
    assert policy_id(policy_preset("strict", refusal_message="No.")).startswith("sha256:")
    p = 0.5
    routes = [policy_preset(n).route(Verdict(p, "unsafe", Tier.UNSAFE)) for n in PRESETS]
    assert routes == [Route.REFUSE, Route.REFUSE, Route.SAFETY_PROMPT]
    with pytest.raises(Exception, match="strict, balanced, permissive"):
        policy_preset("lenient")
