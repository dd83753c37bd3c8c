"""What an adapter does for a model the guard does not host (mlpm_guard.guardrail.external), and the one rule
for adding a system prompt to a conversation (mlpm_guard.vocabulary.messages.with_system_prompt)."""

import pytest

from mlpm_guard import Decision, Policy, Route, Tier, make_verdict
from mlpm_guard.guardrail.external import answered, applied_route, decide, replaces
from mlpm_guard.vocabulary.messages import system_text, with_system_prompt
from mlpm_guard.vocabulary.verdicts import failed_verdict

SAFE = make_verdict(0.1, Tier.SAFE, threshold=0.5)
UNSAFE = make_verdict(0.9, Tier.UNSAFE, threshold=0.5, category="S1")


@pytest.mark.parametrize("route,applied", [(Route.PASS, Route.PASS), (Route.SAFETY_PROMPT, Route.SAFETY_PROMPT),
                                           (Route.STEER, Route.SAFETY_PROMPT), (Route.REFUSE, Route.REFUSE)])
def test_an_external_model_takes_every_route_but_steer_which_becomes_the_safety_prompt(route, applied):
    assert applied_route(route) is applied
    decision = decide(UNSAFE, Policy().forced(route))
    assert (decision.route, decision.applied_route) == (route, applied)
    assert decision.blocked is (applied is Route.REFUSE)
    assert decision.verdict is UNSAFE and decision.stage == "input"


def test_a_verdict_that_could_not_be_computed_is_refused_for_an_external_model_too():
    decision = decide(failed_verdict("RuntimeError: x"), Policy().forced(Route.STEER))
    assert decision.blocked and decision.applied_route is Route.REFUSE


@pytest.mark.parametrize("on_flag,output,replaced", [("replace", UNSAFE, True), ("flag", UNSAFE, False),
                                                     ("replace", SAFE, False), ("replace", None, False)])
def test_a_flagged_answer_is_replaced_only_under_on_flag_replace(on_flag, output, replaced):
    policy = Policy(output_moderation={"enabled": True, "on_flag": on_flag})
    assert replaces(output, policy) is replaced
    after = answered(decide(SAFE, policy), output, policy, stage="output")
    assert (after.replaced, after.blocked, after.stage) == (replaced, replaced, "output")
    assert after.output_verdict is output and after.verdict is SAFE and after.route is Route.PASS


def test_a_broken_answer_ends_as_a_refusal_and_a_refused_request_stays_blocked():
    policy = Policy(output_moderation={"enabled": True, "on_flag": "flag"})
    broken = answered(decide(SAFE, policy), None, policy, broken=True)
    assert broken.replaced and broken.blocked and broken.stage == "input"
    refused = answered(Decision(Route.REFUSE, blocked=True, verdict=UNSAFE), SAFE, policy)
    assert refused.blocked and not refused.replaced


def test_the_system_prompt_is_merged_into_a_leading_system_or_developer_turn():
    assert system_text("Be safe.", None) == system_text("Be safe.", "") == "Be safe."
    assert system_text("Be safe.", "You are terse.") == "Be safe.\n\nYou are terse."
    user = {"role": "user", "content": "hi"}
    assert with_system_prompt([user], "Be safe.") == [{"role": "system", "content": "Be safe."}, user]
    developer = {"role": "developer", "content": "You are terse.", "name": "ops"}
    merged = with_system_prompt([developer, user], "Be safe.")
    assert merged == [{"role": "developer", "content": "Be safe.\n\nYou are terse.", "name": "ops"}, user]
    # Content parts are not text the prompt can be joined to: a system turn of its own goes first.
    parts = {"role": "system", "content": [{"type": "text", "text": "x"}]}
    assert with_system_prompt([parts, user], "Be safe.") == [{"role": "system", "content": "Be safe."}, parts, user]
    assert with_system_prompt([], "Be safe.") == [{"role": "system", "content": "Be safe."}]


def test_a_framework_passes_its_own_message_type():
    messages = [("system", "terse"), ("user", "hi")]
    out = with_system_prompt(messages, "Be safe.", system_of=lambda m: m[1] if m[0] == "system" else None,
                             make=lambda text, old: ("system", text))
    assert out == [("system", "Be safe.\n\nterse"), ("user", "hi")]
