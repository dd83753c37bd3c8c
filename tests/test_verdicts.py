"""Verdict and tier construction (mlpm_guard.vocabulary.verdicts): the one place every verdict comes from."""

import math

import pytest

from mlpm_guard import Policy, Tier, make_verdict, tier_of
from mlpm_guard.guardrail.policy import under_policy
from mlpm_guard.vocabulary.verdicts import failed_verdict, to_verdict


@pytest.mark.parametrize("p,tier", [(0.0, Tier.SAFE), (0.29, Tier.SAFE), (0.3, Tier.CONTROVERSIAL),
                                    (0.69, Tier.CONTROVERSIAL), (0.7, Tier.UNSAFE), (1.0, Tier.UNSAFE)])
def test_tier_of_compares_with_both_thresholds(p, tier):
    assert tier_of(p, 0.7, 0.3) is tier


def test_label_follows_the_tier_and_safe_verdicts_name_no_category():
    unsafe = make_verdict(0.9, Tier.UNSAFE, threshold=0.5, category="S9", layer_scores={3: 0.8})
    assert (unsafe.label, unsafe.category, unsafe.category_name) == ("unsafe", "S9", "Indiscriminate weapons")
    mid = make_verdict(0.4, Tier.CONTROVERSIAL, threshold=0.5, category="S9")
    assert mid.label == "safe" and mid.category == "S9"
    safe = make_verdict(0.1, Tier.SAFE, threshold=0.5, category="S9")
    assert safe.label == "safe" and safe.category is None and safe.category_name is None


def test_failed_verdicts_fail_closed_unless_open():
    closed = failed_verdict("RuntimeError: x", threshold=0.6, n_truncated_tokens=3)
    assert closed.unsafe and closed.p_unsafe == 1.0 and closed.error and closed.n_truncated_tokens == 3
    opened = failed_verdict("RuntimeError: x", fail_open=True)
    assert not opened.unsafe and opened.tier is Tier.SAFE and opened.error


def test_policy_thresholds_move_a_verdict_and_keep_what_it_read():
    v = make_verdict(0.4, Tier.CONTROVERSIAL, threshold=0.5, category="S1", layer_scores={2: 0.4}, view="message")
    assert under_policy(v, Policy()) is v
    moved = under_policy(v, Policy(unsafe_at=0.35))
    assert moved.tier is Tier.UNSAFE and moved.unsafe and moved.threshold == 0.35
    assert (moved.category, moved.layer_scores, moved.view) == ("S1", {2: 0.4}, "message")
    assert under_policy(v, Policy(unsafe_at=0.9, controversial_at=0.8)).category is None


def test_moderator_answers_become_verdicts():
    assert to_verdict(True).unsafe and not to_verdict(False).unsafe
    assert to_verdict(0.6, 0.7).tier is Tier.SAFE and to_verdict(0.7, 0.7).tier is Tier.UNSAFE
    v = make_verdict(0.6, Tier.CONTROVERSIAL, threshold=0.8, category="S2")
    assert to_verdict(v) is v
    assert to_verdict(v, 0.5).unsafe and to_verdict(v, 0.5).threshold == 0.5
    assert to_verdict(v, 0.7).tier is Tier.CONTROVERSIAL
    with pytest.raises(TypeError, match="must return a Verdict"):
        to_verdict("unsafe")
    assert to_verdict(math.nan).unsafe and to_verdict(math.nan).error  # a NaN never passes as safe
