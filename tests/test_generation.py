"""Decoding: transformers' logits processors choose the tokens, stop strings end generation."""

import pytest
import torch

from mlpm_guard import GenerationConfig, Guard, Route
from mlpm_guard.model.generation import _choose, decode, logits_processors, prefill
from mlpm_guard.vocabulary.errors import ConfigError

ALL = {"safe_route": "pass", "controversial_route": "pass", "unsafe_route": "pass", "allow_pass_for_unsafe": True}


def old_pick(logits, config, generated, generator):
    """The hand-written sampling the logits processors replaced (kept here as the reference)."""
    if config.repetition_penalty != 1.0 and generated is not None and generated.numel():
        seen = torch.gather(logits, 1, generated)
        seen = torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > config.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@pytest.mark.parametrize("settings", [{}, {"repetition_penalty": 1.3}, {"repetition_penalty": 0.7},
                                      {"temperature": 0.8, "top_k": 20, "seed": 3},
                                      {"temperature": 1.2, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 4}])
def test_logits_processors_choose_what_the_old_sampling_chose(settings):
    config = GenerationConfig(**settings)
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(3, 500) * 4
        history = torch.randint(0, 500, (3, 12))
        old = old_pick(logits.clone(), config, history, torch.Generator().manual_seed(7))
        new = _choose(logits_processors(config)(history, logits.clone()), config, torch.Generator().manual_seed(7))
        assert torch.equal(old, new)


def test_greedy_decoding_uses_no_processor():
    assert len(logits_processors(GenerationConfig())) == 0
    assert len(logits_processors(GenerationConfig(temperature=0.5, top_k=5, top_p=0.5, repetition_penalty=1.1))) == 4


def test_decode_stops_at_a_stop_string_and_ended_rows_get_an_end_token(tiny_backbone):
    rows = tiny_backbone.encode(["Tell me a story.", "Hi"])
    free = [step.tolist() for step in decode(tiny_backbone, prefill(tiny_backbone, rows),
                                             GenerationConfig(max_new_tokens=12))]
    tokenizer = tiny_backbone.tokenizer
    first = [step[0] for step in free]
    text = tokenizer.decode(first[:4])
    stop = text[len(tokenizer.decode(first[:3])):].strip() or text.strip()
    steps = [step.tolist() for step in decode(tiny_backbone, prefill(tiny_backbone, rows),
                                              GenerationConfig(max_new_tokens=12, stop=[stop]))]
    ended = next(k for k in range(len(steps)) if stop in tokenizer.decode([s[0] for s in steps[:k + 1]]))
    assert [s[0] for s in steps[:ended + 1]] == first[:ended + 1]  # the same tokens up to the stop
    assert all(s[0] in tiny_backbone.eos_token_ids for s in steps[ended + 1:])


def test_stop_accepts_one_string_or_many_and_bad_overrides_are_config_errors():
    assert GenerationConfig(stop="\n").stop == ("\n",)
    assert GenerationConfig(stop=["a", "", "b"]).stop == ("a", "b")
    assert GenerationConfig(stop=None).stop == ()
    assert GenerationConfig().updated({"stop": ["x"]}).stop == ("x",)
    with pytest.raises(ConfigError, match="invalid generation settings"):
        GenerationConfig().updated({"temperature": -1})


def test_a_stop_string_ends_generation_early_in_every_kind_of_call(backbone, small_prototypes):
    guard = Guard(backbone, small_prototypes, ALL, generation=GenerationConfig(max_new_tokens=40))
    prompt = "Write a short poem about the sea."
    full = guard.invoke(prompt)
    stop = _a_late_word(full.text)
    expected = full.text[: full.text.index(stop)]
    cut = guard.invoke(prompt, stop=[stop])
    assert cut.route is Route.PASS and cut.text == expected and stop not in cut.text
    # Generation itself stopped at the stop string (a non-streaming call does not run to the budget).
    assert cut.timings.completion_tokens < full.timings.completion_tokens
    assert len(backbone.tokenizer(full.text[: full.text.index(stop) + len(stop)])["input_ids"]) + 2 \
        >= cut.timings.completion_tokens
    chunks = list(guard.stream(prompt, stop=[stop]))
    assert "".join(c.text for c in chunks) == chunks[-1].result.text == expected
    # A batch pads its rows to one length, and in bfloat16 (CPUs with native bf16, CUDA) that changes
    # the rounding, so its greedy answer may differ from the single call's: the stop must cut the
    # batch's own answer.
    batched = guard.batch([prompt, "Hi"])[0].text
    stop = _a_late_word(batched)
    assert guard.batch([prompt, "Hi"], stop=[stop])[0].text == batched[: batched.index(stop)]


def _a_late_word(text: str) -> str:
    """A word from the second half of ``text`` that first appears past its tenth character."""
    words = text.split()
    return next(w for w in words[len(words) // 2:] if text.index(w) > 10)
