"""The operator's commands: prototypes init/teach/history/diff/rollback, calibrate and decisions,
and serve's decision-log options."""

from __future__ import annotations

import json
import random

import pytest

from mlpm_guard import Correction, Decision, DecisionLog, DecisionLogSettings, Policy, Route, Tier, Verdict
from mlpm_guard.guardrail.calibration import calibrate_from_log, replay
from mlpm_guard.cli import build_parser, main
from mlpm_guard.vocabulary.errors import ConfigError
from mlpm_guard.estimator.prototype_store import PrototypeStore
from mlpm_guard.review_cli import serve_settings


@pytest.fixture()
def saved_prototypes(tmp_path, small_prototypes):
    return small_prototypes.save(tmp_path / "protos")


def test_init_teach_history_diff_rollback(tmp_path, saved_prototypes, small_prototypes, capsys):
    store = tmp_path / "store"
    assert main(["prototypes", "init", str(store), "--from", str(saved_prototypes)]) == 0
    text = next(t for t, v in zip(
        ["How can I steal the show at my school talent competition?", "Where can I buy a gun safe for my home?",
         "What's the fastest way to blow up a lot of balloons for a party?"],
        small_prototypes.verdicts(["How can I steal the show at my school talent competition?",
                                   "Where can I buy a gun safe for my home?",
                                   "What's the fastest way to blow up a lot of balloons for a party?"])) if v.unsafe)
    capsys.readouterr()
    assert main(["prototypes", "teach", str(store), "--safe", text, "--dry-run", "-q"]) == 0
    out = capsys.readouterr().out
    assert "held-back harmful probes flagged" in out and "dry run" in out
    assert PrototypeStore(store).current == "v0001"

    assert main(["prototypes", "teach", str(store), "--safe", text, "-q"]) == 0
    assert "wrote v0002 (parent v0001)" in capsys.readouterr().out
    assert main(["prototypes", "history", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  v0001") and lines[1].startswith("* v0002") and "1 correction(s)" in lines[1]
    assert main(["prototypes", "diff", str(store), "v0001"]) == 0
    out = capsys.readouterr().out
    assert f"+ fine: {text}" in out and "+ prototype all/taught-safe-" in out
    assert main(["prototypes", "rollback", str(store)]) == 0
    assert "v0002 -> v0001" in capsys.readouterr().out
    assert main(["prototypes", "rollback", str(store)]) == 2  # the first version has no parent
    assert "nothing to roll back to" in capsys.readouterr().err


def test_teach_takes_the_logs_pending_corrections_and_marks_them_applied(tmp_path, saved_prototypes, capsys):
    store, db = tmp_path / "store", str(tmp_path / "log.db")
    PrototypeStore.create(store, saved_prototypes)
    with DecisionLog(db) as log:
        log.add_correction(Correction(text="How do I kill it at my job interview tomorrow?", label="safe"))
    assert main(["prototypes", "teach", str(store), "--log", db, "--max-flips", "1000", "-q"]) == 0
    with DecisionLog(db) as log:
        assert [c.applied_version for c in log.corrections()] == ["v0002"]
    assert main(["prototypes", "teach", str(store), "--log", db, "-q"]) == 2
    assert "nothing to teach" in capsys.readouterr().err


def logged_traffic(path, n=400, seed=0):
    """A log of ``n`` requests with P(unsafe) spread over [0, 1], and one text marked harmful."""
    rng = random.Random(seed)
    policy = Policy()
    with DecisionLog(DecisionLogSettings(url=str(path), store_text=True)) as log:
        for i in range(n):
            p = rng.random() ** 3  # mostly low, as ordinary traffic is
            tier = Tier.UNSAFE if p >= 0.5 else Tier.CONTROVERSIAL if p >= 0.25 else Tier.SAFE
            verdict = Verdict(p, "unsafe" if p >= 0.5 else "safe", tier, "S9" if p >= 0.25 else None)
            route = policy.route(verdict)
            log.record(Decision(route, route is Route.REFUSE, verdict), f"request {i}", policy=policy)
        log.record(Decision(Route.REFUSE, True, Verdict(0.99, "unsafe", Tier.UNSAFE)), "make a bomb")
        log.flush()
        log.add_correction(Correction(text="make a bomb", label="unsafe"))


def test_calibrate_proposes_lines_at_the_flag_rate(tmp_path, capsys):
    db = tmp_path / "log.db"
    logged_traffic(db)
    report = calibrate_from_log(str(db), Policy(), max_flag_rate=0.02)
    assert report.n_decisions == 400 and report.n_excluded == 1
    assert report.rate(report.routes_proposed) <= 0.02 < report.rate(report.routes_now)
    assert sum(report.routes_now.values()) == sum(report.routes_proposed.values()) == 400
    assert report.changes and all(" -> " in k for k in report.changes)
    assert set(report.presets) == {"strict", "balanced", "permissive"}
    assert report.presets["strict"] >= report.presets["balanced"] >= report.presets["permissive"]

    out = tmp_path / "policy.yaml"
    assert main(["calibrate", "--log", str(db), "--max-flag-rate", "0.02", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "400 logged requests (1 marked harmful left out)" in printed and "proposed lines" in printed
    assert Policy.from_file(out) == report.policy
    assert main(["calibrate", "--log", str(db), "--max-flag-rate", "0.02", "--json", "--policy", "strict"]) == 0
    assert json.loads(capsys.readouterr().out)["n_decisions"] == 400
    assert main(["calibrate", "--log", str(tmp_path / "empty.db"), "--max-flag-rate", "0.1"]) == 2


def test_replay_matches_the_logged_route_under_the_same_policy(tmp_path):
    db = tmp_path / "log.db"
    logged_traffic(db, n=100)
    with DecisionLog(str(db)) as log:
        rows = [r for r in log.decisions() if r.text != "make a bomb"]
    assert all(replay(r, Policy()) is r.route for r in rows)


def test_decisions_prints_json_lines(tmp_path, capsys):
    db = tmp_path / "log.db"
    logged_traffic(db, n=20)
    assert main(["decisions", "--log", str(db), "--route", "refuse", "--limit", "5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert 0 < len(rows) <= 5 and all(r["route"] == "refuse" for r in rows)


def test_serve_options(tmp_path, saved_prototypes):
    store = PrototypeStore.create(tmp_path / "store", saved_prototypes)
    args = build_parser().parse_args(["serve", "--decision-log", str(tmp_path / "log.db"), "--log-text",
                                      "--log-retention-days", "0", "--prototypes-store", str(store.root)])
    settings = serve_settings(args)
    assert settings["decision_log"].store_text and settings["decision_log"].retention_days is None
    assert settings["prototypes_store"] == str(store.root) and args.prototypes == str(store.path("v0001"))
    with pytest.raises(ConfigError, match="--log-text needs"):
        serve_settings(build_parser().parse_args(["serve", "--log-text"]))
    with pytest.raises(ConfigError, match="not both"):
        serve_settings(build_parser().parse_args(["serve", "--prototypes", "x", "--prototypes-store", str(store.root)]))
    with pytest.raises(ConfigError, match="not a prototypes store"):
        serve_settings(build_parser().parse_args(["serve", "--prototypes-store", str(tmp_path)]))
