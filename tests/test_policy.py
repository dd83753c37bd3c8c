"""Routing by tier and category, monotonicity, calibration, and policy files."""

import numpy as np
import pytest

from mlpm_guard import ConfigError, Policy, Route, Tier, Verdict


def verdict(p, tier=None, category=None, threshold=0.5):
    tier = tier or (Tier.UNSAFE if p >= threshold else Tier.CONTROVERSIAL if p >= 0.25 else Tier.SAFE)
    return Verdict(p, "unsafe" if tier is Tier.UNSAFE else "safe", tier, category, threshold=threshold)


@pytest.mark.parametrize("p,route", [(0.01, Route.PASS), (0.3, Route.SAFETY_PROMPT), (0.7, Route.REFUSE)])
def test_default_routes_by_tier(p, route):
    assert Policy().route(verdict(p)) is route


def test_policy_thresholds_override_the_verdict_tier():
    policy = Policy(controversial_at=0.1, unsafe_at=0.2)
    assert policy.route(verdict(0.15)) is Route.SAFETY_PROMPT
    assert policy.route(verdict(0.25)) is Route.REFUSE
    assert policy.route(verdict(0.05)) is Route.PASS


def test_category_overrides_apply_to_non_safe_verdicts():
    policy = Policy(category_routes={"S4": "refuse", "specialized advice": "safety_prompt"})
    assert policy.category_routes == {"S4": Route.REFUSE, "S6": Route.SAFETY_PROMPT}
    assert policy.route(verdict(0.3, category="S4")) is Route.REFUSE
    assert policy.route(verdict(0.9, category="S6")) is Route.SAFETY_PROMPT
    assert policy.route(verdict(0.01, category="S4")) is Route.PASS  # safe verdicts are never overridden


def test_higher_score_never_gets_milder_route():
    policy = Policy(controversial_route="steer", unsafe_route="refuse")
    severities = [policy.route(verdict(p)).severity for p in np.linspace(0, 1, 101)]
    assert severities == sorted(severities)


@pytest.mark.parametrize("fields,message", [
    ({"controversial_route": "refuse", "unsafe_route": "pass"}, "milder route"),
    ({"safe_route": "steer", "controversial_route": "safety_prompt"}, "milder route"),
    ({"controversial_at": 0.6, "unsafe_at": 0.4}, "must not exceed"),
    ({"safe_route": "safety_prompt", "category_routes": {"S1": "pass"}}, "milder than the safe route"),
    ({"unsafe_at": 1.5}, "less than 1"),
])
def test_invalid_policies_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        Policy(**fields)


def test_calibration_bounds_the_flag_rate():
    rng = np.random.default_rng(0)
    benign = rng.beta(1, 8, 1000)
    policy = Policy().calibrated(benign, max_flag_rate=0.05)
    assert (benign >= policy.unsafe_at).mean() <= 0.05
    assert (benign >= policy.controversial_at).mean() <= 0.10
    assert policy.controversial_at <= policy.unsafe_at
    assert (benign >= Policy().calibrated(benign, max_flag_rate=0.0).unsafe_at).mean() == 0.0
    with pytest.raises(ConfigError, match="at least one"):
        Policy().calibrated([], max_flag_rate=0.1)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_policy_file_round_trip(tmp_path, suffix):
    policy = Policy(unsafe_at=0.7, category_routes={"S6": "safety_prompt"}, steering={"alpha": 0.5, "layers": [10, 12]},
                    output_moderation={"enabled": True, "check_every": 8})
    path = policy.to_file(tmp_path / f"policy{suffix}")
    assert Policy.from_file(path) == policy


def test_policy_file_errors_and_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("unsafe_route: explode\n")
    with pytest.raises(ConfigError, match="invalid policy"):
        Policy.from_file(bad)
    newer = tmp_path / "newer.yaml"
    newer.write_text("unsafe_at: 0.6\nfuture_knob: 3\n")
    with pytest.warns(UserWarning, match="future_knob"):
        assert Policy.from_file(newer).unsafe_at == 0.6
    with pytest.raises(ConfigError, match="cannot read"):
        Policy.from_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("route", list(Route))
def test_forced_sends_every_verdict_to_one_route_and_keeps_the_rest(route, tmp_path):
    base = Policy(controversial_at=0.2, unsafe_at=0.6, category_routes={"S9": "refuse"}, safety_prompt="BE SAFE",
                  output_moderation={"enabled": True, "on_flag": "flag"}, steering={"alpha": 0.5})
    forced = base.forced(route)
    for p, category in ((0.01, None), (0.3, "S9"), (0.9, "S9"), (0.9, None)):
        assert forced.route(verdict(p, category=category)) is route
    assert forced.category_routes == {} and forced.safety_prompt == "BE SAFE" and forced.steering.alpha == 0.5
    assert forced.output_moderation == base.output_moderation
    assert (forced.controversial_at, forced.unsafe_at) == (0.2, 0.6)
    assert forced.allow_pass_for_unsafe is (route is Route.PASS)  # a forced pass says so in as many words
    assert Policy.from_file(forced.to_file(tmp_path / "forced.yaml")) == forced  # a valid policy, not a raw copy
    assert not base.forced(route, output_moderation=False).output_moderation.enabled
    failed = Verdict(1.0, "unsafe", Tier.UNSAFE, error="ScoringError: boom")
    assert base.forced(Route.PASS).route(failed) is Route.REFUSE  # fail closed whatever the route
    assert base.forced(route.value) == forced  # the route's name works too
