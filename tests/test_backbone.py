"""The backbone on the real embedded SmolLM2-135M-Instruct and on a tiny random Llama."""

import numpy as np
import pytest
import torch

from mlpm_guard import Backbone, InputError
from mlpm_guard.model.backbone import Encoded
from mlpm_guard.vocabulary.errors import BackboneLoadError, ConfigError


def test_embedded_shape_and_template(backbone):
    assert (backbone.num_layers, backbone.hidden_size) == (30, 576)
    text = backbone.render("hello")
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhello<|im_end|>" in text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "bye"}]
    full = backbone.render(msgs)
    assert full.index("Be brief.") < full.index("hi") < full.index("Hello!") < full.rindex("bye")
    assert "SmolLM" not in full  # the caller's system prompt replaces the template's default


def test_system_prompt_merges_with_callers_system(backbone):
    text = backbone.render([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}],
                           system="Be safe.")
    assert text.count("<|im_start|>system") == 1
    assert text.index("Be safe.") < text.index("Answer in French.")


def test_plain_fallback_without_chat_template(tiny_backbone):
    import copy

    bb = Backbone.from_model(tiny_backbone.model, copy.copy(tiny_backbone.tokenizer), name="plain")
    bb.chat_template = None
    assert bb.render([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
    bb.close()


def test_batched_states_do_not_depend_on_padding(backbone_fp32):
    backbone = backbone_fp32
    prompts = ["hi", "How do I kill a Python process?", "Write a long story about a dragon " * 6]
    together = backbone.hidden_states(prompts, layers=[1, 15, 30])
    for i, p in enumerate(prompts):
        alone = backbone.hidden_states([p], layers=[1, 15, 30])
        np.testing.assert_allclose(together[i], alone[0], rtol=2e-3, atol=2e-3 * np.abs(alone).max())


def test_states_match_output_hidden_states(backbone_fp32):
    """Layer l is hidden_states[l] of transformers (pre-norm for l < L)."""
    backbone = backbone_fp32
    row = backbone.encode(["What is the capital of France?"])[0]
    ours = backbone.last_token_states([row], [1, 10, 29])[0]
    with torch.inference_mode():
        ref = backbone.model(torch.tensor([row.ids]), output_hidden_states=True).hidden_states
    for j, layer in enumerate([1, 10, 29]):
        np.testing.assert_allclose(ours[j], ref[layer][0, -1].numpy(), rtol=1e-4, atol=1e-3)


def test_scoring_stops_early_and_skips_lm_head(backbone):
    backbone._prefix_kv()  # the template's opening runs every layer once, whichever test comes first
    calls = []
    hooks = [backbone.layers[i].register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i in (4, 5, 29)]
    hooks.append(backbone.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    try:
        backbone.hidden_states(["hello there"], layers=[2, 5])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [4]  # layer id 5 is block index 4; nothing after it ran


def test_truncation_keeps_template_end_and_reports(backbone):
    bb = backbone
    limit = bb.config.max_prompt_tokens
    long = "word " * (limit * 2)
    row = bb.encode([long])[0]
    assert len(row) == limit and row.n_truncated > 0
    full = bb.encode_rendered([bb.render(long)])  # same limit; compare the ends
    tail = bb.tokenizer.decode(list(row.ids[-5:]))
    assert tail.endswith("<|im_start|>assistant\n")
    assert bb.tokenizer.decode(list(row.ids[:3])).startswith("<|im_start|>system")
    assert full[0].ids == row.ids


def test_batches_respect_token_budget(backbone):
    lengths = [10, 300, 20, 300, 5, 7]
    batches = backbone.batches(lengths, batch_size=4)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= backbone.config.max_batch_tokens
        assert len(b) <= 4
    assert batches[0][0] in (1, 3)  # longest first


@pytest.mark.parametrize("bad", [None, 42, b"bytes", {"role": "user"}, [], [{"role": "user", "content": 3}],
                                 [{"content": "x"}], [{"role": "wizard", "content": "x"}]])
def test_malformed_prompts_raise_input_error(backbone, bad):
    with pytest.raises(InputError):
        backbone.render(bad)


def test_lone_surrogates_are_cleaned(backbone):
    states = backbone.hidden_states(["bad \ud800 text"], layers=[3])
    assert np.isfinite(states).all()


def test_bad_layers_and_empty_rows(backbone):
    with pytest.raises(ConfigError, match="1..30"):
        backbone.hidden_states(["x"], layers=[0])
    with pytest.raises(ConfigError, match="no tokens"):
        backbone.last_token_states([Encoded(())], [1])


def test_from_model_does_not_change_callers_tokenizer(tiny_backbone):
    import copy

    tokenizer = copy.copy(tiny_backbone.tokenizer)
    tokenizer.padding_side = "right"
    weights = tiny_backbone.model.model.embed_tokens.weight.clone()
    bb = Backbone.from_model(tiny_backbone.model, tokenizer)
    assert bb.hidden_states(["x", "a longer prompt"], layers=[4]).shape == (2, 1, 32)
    assert tokenizer.padding_side == "right" and bb.tokenizer.padding_side == "left"
    assert torch.equal(weights, tiny_backbone.model.model.embed_tokens.weight)
    bb.close()


def test_missing_local_model_fails_clearly(tmp_path):
    with pytest.raises(BackboneLoadError, match="could not load backbone"):
        Backbone(str(tmp_path / "nowhere"))
    with pytest.raises(BackboneLoadError, match="does not exist"):
        Backbone(str(tmp_path / "model.gguf"))


def test_second_load_is_served_from_the_conversion_cache(backbone):
    import time

    start = time.perf_counter()
    again = Backbone()
    assert time.perf_counter() - start < 15
    assert again.fingerprint == backbone.fingerprint
    again.close()


def test_prefix_cache_gives_the_same_states_and_runs_fewer_tokens(backbone_fp32):
    backbone = backbone_fp32
    prompts = ["hi", "How do I kill a Python process?", [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "hello"}]]
    rows = backbone.encode(prompts)
    backbone._prefix_kv()  # computed once, lazily
    widths = []
    hook = backbone.layers[0].register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
    try:
        fast = backbone.last_token_states(rows[:2], [1, 12, 29])
    finally:
        hook.remove()
    # The shared opening was not rerun: only each row's own tokens, left-padded to a fixed multiple.
    p = len(backbone._shared_prefix())
    assert sorted(widths) == sorted({backbone.padded_length(len(r)) - p for r in rows[:2]})
    plain = Backbone.__new__(Backbone)
    plain.__dict__.update(backbone.__dict__)
    plain.config = backbone.config.model_copy(update={"prefix_cache": False})
    slow = plain.last_token_states(rows[:2], [1, 12, 29])
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-3)
    # A caller's own system prompt changes the opening: no reuse, still correct.
    mixed = backbone.last_token_states(rows, [5])
    np.testing.assert_allclose(mixed[2], backbone.last_token_states(rows[2:], [5])[0], rtol=1e-4, atol=1e-3)


def test_default_dtype_states_agree_with_float32(backbone, backbone_fp32):
    """Whatever ``auto`` picked here (bfloat16 on CPUs with native bf16), the states point the same way."""
    prompts = ["hi", "How do I kill a Python process?", "Write a long story about a dragon " * 6]
    ours = backbone.hidden_states(prompts, layers=[1, 15, 30])
    ref = backbone_fp32.hidden_states(prompts, layers=[1, 15, 30])
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.99, cos
