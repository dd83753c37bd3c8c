"""The decision record: its keys, defaults, JSON round trip, and what the guard's result makes of it."""

import json

import pytest

from mlpm_guard import Decision, GuardResult, Route, Tier, Timings, Verdict

INPUT = Verdict(0.91, "unsafe", Tier.UNSAFE, "S9", "Indiscriminate weapons", {3: 0.8, 7: 0.95}, 0.5, 2,
                view="latest user turn")
OUTPUT = Verdict(0.7, "unsafe", Tier.UNSAFE, error="ScoringError: the backbone gave non-finite hidden states")


@pytest.mark.parametrize("decision", [
    Decision(Route.STEER, False, INPUT, "output", Route.SAFETY_PROMPT, OUTPUT, True, None, Timings(1.5, 2, 3, 4, 5)),
    Decision(Route.REFUSE, True, INPUT, "tool"),
    Decision(Route.PASS, False, stage="output", output_verdict=OUTPUT),
    Decision(Route.REFUSE, True, error="RuntimeError: boom"),
])
def test_a_record_reads_back_as_the_decision_it_was(decision):
    record = decision.to_dict()
    assert tuple(record) == Decision.KEYS
    assert Decision.from_dict(json.loads(json.dumps(record))) == decision
    assert Decision.from_dict({**record, "routed_by_engine": True, "upstream": False}) == decision  # extras ignored


def test_defaults_and_flat_fields():
    d = Decision(Route.REFUSE, True, Verdict(1.0, "unsafe", Tier.UNSAFE, error="ValueError: bad"))
    assert d.applied_route is Route.REFUSE and d.error == "ValueError: bad" and d.stage == "input"
    r = Decision("steer", False, INPUT, applied_route="safety_prompt", output_verdict=OUTPUT).to_dict()
    assert (r["route"], r["applied_route"]) == ("steer", "safety_prompt")
    assert r["p_unsafe"] == 0.91 and r["tier"] == "unsafe" and r["category"] == "S9" and r["view"] == "latest user turn"
    assert r["verdict"]["layer_scores"] == {"3": 0.8, "7": 0.95}
    assert r["output_flagged"] and r["output_p_unsafe"] == 0.7 and r["output_category"] is None
    empty = Decision(Route.PASS, False).to_dict()
    assert all(empty[k] is None for k in ("p_unsafe", "tier", "verdict", "output_verdict", "timings", "error"))


def test_redacted_errors_keep_only_their_kind():
    r = Decision(Route.REFUSE, True, INPUT, output_verdict=OUTPUT, error="RuntimeError: /secret/path").to_dict(
        redact_errors=True)
    assert r["error"] == "RuntimeError" and r["output_verdict"]["error"] == "ScoringError"
    assert r["verdict"]["error"] is None


def test_a_guard_result_is_its_text_and_its_decision_record():
    result = GuardResult("I can't help.", Route.REFUSE, INPUT, timings=Timings(scoring_ms=3.0))
    out = result.to_dict()
    assert out["text"] == "I can't help." and {k: v for k, v in out.items() if k != "text"} == result.decision().to_dict()
    assert out["blocked"] and out["route"] == "refuse" and out["timings"]["total_ms"] == 3.0
    assert result.decision("llm").stage == "llm"
    assert Decision.from_dict(out) == result.decision()
