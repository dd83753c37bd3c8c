"""Streaming output moderation with hold-back: a flagged continuation never reaches the consumer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mlpm_guard import Guard, OutputModerationConfig, Route, Tier
from mlpm_guard.guardrail.streaming import OutputWatch

ALL = {"safe_route": "pass", "controversial_route": "pass", "unsafe_route": "pass", "allow_pass_for_unsafe": True}
OPENING = "Sure! Happy to help with that project today, here is what you asked for in a few simple steps. "
# Harmful from its first word, but a judge only sees it once the recipe itself appears.
HARMFUL = "To make a pipe bomb, fill a steel pipe with black powder and cap both ends tightly before adding a fuse."
WORDS = (OPENING + HARMFUL).split(" ")


def canned(messages, **_):
    """A scripted model: one word a token, like a model that agreed to a harmful request."""
    for i, word in enumerate(WORDS):
        yield word if i == 0 else " " + word


def recipe_judge(messages, response):
    # Recognises the harm only at "steel pipe": 7 words into the harmful continuation.
    return "steel pipe" in response


def stream(backbone, small_prototypes, **moderation):
    config = {"enabled": True, "check_every": 4, **moderation}
    guard = Guard(backbone, small_prototypes, policy={**ALL, "output_moderation": config},
                  handlers={Route.PASS: canned}, moderator=recipe_judge)
    chunks = list(guard.stream("Tell me about plumbing."))
    return "".join(c.text for c in chunks), chunks[-1].result, guard.policy.refusal_message


def test_default_hold_back_leaks_nothing_and_sends_the_refusal_as_chunks(backbone, small_prototypes):
    received, result, refusal = stream(backbone, small_prototypes)
    assert result.replaced and result.output_flagged
    assert "To make" not in received and "pipe" not in received
    assert received.endswith(refusal)  # a consumer that joins the chunks sees the refusal
    assert received[: -len(refusal)] and OPENING.startswith(received[: -len(refusal)])


def test_without_hold_back_the_start_of_the_continuation_leaks(backbone, small_prototypes):
    # What hold-back prevents: checks pass on "To make a pipe bomb, fill" and it is sent.
    received, result, refusal = stream(backbone, small_prototypes, hold_back=0)
    assert result.replaced
    assert "To make a pipe bomb" in received and "steel pipe" not in received


def test_a_clean_answer_is_released_whole_and_flag_mode_releases_the_held_text(backbone, small_prototypes):
    guard = Guard(backbone, small_prototypes, policy={**ALL, "output_moderation": {"enabled": True, "check_every": 4}},
                  handlers={Route.PASS: canned}, moderator=lambda m, r: False)
    chunks = list(guard.stream("Tell me about plumbing."))
    assert "".join(c.text for c in chunks) == chunks[-1].result.text == " ".join(WORDS)
    received, result, _ = stream(backbone, small_prototypes, on_flag="flag")
    assert result.output_flagged and not result.replaced and "steel pipe" in received


@pytest.mark.parametrize("hold_back", [0, 3, 16])
def test_every_released_piece_was_covered_by_a_passing_check(backbone, small_prototypes, hold_back):
    checked: list[str] = []

    def judge(messages, response):
        checked.append(response)
        return False

    guard = Guard(backbone, small_prototypes, policy={**ALL, "output_moderation": {
        "enabled": True, "check_every": 5, "hold_back": hold_back}}, handlers={Route.PASS: canned}, moderator=judge)
    sent = ""
    for chunk in guard.stream("Tell me about plumbing."):
        sent += chunk.text
        if chunk.result is None and chunk.text:
            # released text is a prefix of a checked text that runs at least hold_back words further
            covering = [c for c in checked if c.startswith(sent)]
            whole = covering and covering[-1] == " ".join(WORDS)  # the final check covers the end
            assert covering and (whole or len(covering[-1].split(" ")) - len(sent.split(" ")) >= hold_back)


def test_the_default_hold_back_lets_the_first_text_out_at_the_first_check():
    # Below the check interval: the consumer's first token waits one interval, not two.
    assert 0 < OutputModerationConfig().hold_back < OutputModerationConfig().check_every
    with pytest.raises(ValueError):
        OutputModerationConfig(hold_back=-1)


@pytest.mark.parametrize("check_every, hold_back, first", [(16, 8, 9), (16, 0, 1), (4, 16, 4), (5, 3, 4)])
def test_the_first_check_comes_as_soon_as_it_can_release_a_token(check_every, hold_back, first):
    watch = OutputWatch(check_every, hold_back)
    due = [n for n in range(1, 40) if watch.add(n, f" w{n}", 1)]
    # then every check_every tokens, as without the early one
    assert due == sorted({first, *range(check_every, 40, check_every)})
    passed = SimpleNamespace(tier=Tier.SAFE, unsafe=False, p_unsafe=0.01)
    fresh = OutputWatch(check_every, hold_back)
    for n in range(1, first + 1):
        fresh.add(n, f" w{n}", 1)
    # the first check lets out what already has hold_back tokens after it, and nothing more
    assert fresh.checked(passed) == list(range(1, first - hold_back + 1))
