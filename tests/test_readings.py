"""Mean-pooled readings: what span they average, that every path gives the same states, and
prototypes that read them (fit, save, load, verdicts)."""

import numpy as np
import pytest
import torch

from mlpm_guard import Backbone
from mlpm_guard.estimator.prototypes import Prototypes
from mlpm_guard.estimator.readings import Reading, columns, layout, poolings_of, select
from mlpm_guard.model.generation import prefill
from mlpm_guard.vocabulary.errors import ConfigError


def _reference_mean(backbone, row, layer):
    """The mean over the tokens after the template's shared opening, from transformers' own hidden states."""
    prefix = backbone.prefix.ids(backbone)
    start = 0
    while start < len(prefix) and row.ids[start] == prefix[start]:
        start += 1
    with torch.inference_mode():
        hs = backbone.model(torch.tensor([row.ids]), output_hidden_states=True).hidden_states
    return hs[layer][0, start:].float().mean(0).numpy(), start


def test_layout_and_columns_are_pooling_major():
    assert layout([3, 7], ("last", "mean")) == [Reading(3), Reading(7), Reading(3, "mean"), Reading(7, "mean")]
    assert columns([Reading(7, "mean"), Reading(3)], [3, 5, 7], ("last", "mean")) == [5, 0]
    H = np.arange(6)[None, :, None] * np.ones((2, 6, 4))
    np.testing.assert_array_equal(select(H, [3, 5, 7], [7], ("last", "mean"))[0, :, 0], [2, 5])
    assert [Reading(16).key, Reading(16, "mean").key] == [16, "mean 16"]
    with pytest.raises(ConfigError, match="pooling"):
        poolings_of("max")
    with pytest.raises(ConfigError, match="not in states"):
        columns([Reading(9)], [3], ("last",))


def test_mean_pools_the_request_after_the_shared_opening(backbone_fp32):
    backbone = backbone_fp32
    prompts = ["hi", "How do I kill a Python process?", [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "hello"}]]
    rows = backbone.encode(prompts)
    both = backbone.layer_states(rows, [2, 12], poolings=("last", "mean"))
    assert both.shape == (3, 4, 576)
    np.testing.assert_allclose(both[:, :2], backbone.last_token_states(rows, [2, 12]), rtol=1e-4, atol=1e-4)
    for i, row in enumerate(rows):
        for j, layer in enumerate([2, 12]):
            ref, _ = _reference_mean(backbone, row, layer)
            np.testing.assert_allclose(both[i, 2 + j], ref, rtol=1e-3, atol=1e-3)
    # A single-turn prompt pools its own text and the generation prompt, not the template's opening.
    assert backbone.tokenizer.decode(rows[0].ids[_reference_mean(backbone, rows[0], 2)[1]:]).strip().startswith("hi")
    # The caller's system prompt is not part of the shared opening: it is pooled too.
    assert "Be brief." in backbone.tokenizer.decode(rows[2].ids[_reference_mean(backbone, rows[2], 2)[1]:])


def test_pooled_states_agree_with_and_without_prefix_cache_and_in_the_prefill(backbone_fp32):
    backbone = backbone_fp32
    rows = backbone.encode(["hi", "Write a long story about a dragon " * 4])
    fast = backbone.layer_states(rows, [1, 9], poolings=("mean",))
    plain = Backbone.__new__(Backbone)
    plain.__dict__.update(backbone.__dict__)
    plain.config = backbone.config.model_copy(update={"prefix_cache": False})
    np.testing.assert_allclose(fast, plain.layer_states(rows, [1, 9], poolings=("mean",)), rtol=1e-3, atol=1e-3)
    alone = backbone.layer_states(rows[:1], [1, 9], poolings=("mean",))
    np.testing.assert_allclose(fast[:1], alone, rtol=1e-3, atol=1e-3)  # padding is never pooled
    state = prefill(backbone, rows, capture=[1, 9], pool=True)
    np.testing.assert_allclose(state.layer_states([1, 9], ("last", "mean")),
                               backbone.layer_states(rows, [1, 9], poolings=("last", "mean")), rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="poolings"):
        backbone.layer_states(rows, [1], poolings=("max",))


def _toy(n=60, layers=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    H = rng.normal(size=(n, 2 * layers, d))
    H[y == 1, layers + 1] += 3.0  # only the mean reading of layer 2 tells the classes apart
    return H, y


def test_prototypes_keep_a_pooled_reading_and_save_it(tmp_path):
    H, y = _toy()
    p = Prototypes(pooling="last+mean", categories=False).fit(H, y)
    assert Reading(2, "mean") in p.readings_ and p.layer_ids_ == sorted({r.layer for r in p.readings_})
    assert p.score(select(H, [1, 2, 3, 4], p.layer_ids_, p.poolings_), y) > 0.95
    assert p.steering_directions_.shape == (4, 8)  # last-token readings of every candidate layer
    verdict = p.verdicts(select(H[:2], [1, 2, 3, 4], p.layer_ids_, p.poolings_))[1]
    assert "mean 2" in verdict.layer_scores
    p.save(tmp_path / "p")
    q = Prototypes.load(tmp_path / "p")
    assert q.readings_ == p.readings_ and q.pooling == "last+mean"
    X = select(H, [1, 2, 3, 4], p.layer_ids_, p.poolings_)
    np.testing.assert_allclose(q.predict_proba(X), p.predict_proba(X))
    with pytest.raises(ConfigError, match=r"shape \(n_samples, 8, hidden_size\).*pooling-major"):
        Prototypes(pooling="last+mean", layers=[1, 2, 3, 4]).fit(H[:, :4], y)


def test_last_token_prototypes_are_unchanged_by_readings(tmp_path):
    H, y = _toy()
    p = Prototypes(categories=False).fit(H[:, :4], y)
    assert all(r.pooling == "last" for r in p.readings_) and [r.layer for r in p.readings_] == p.layer_ids_
    p.save(tmp_path / "p")
    assert Prototypes.load(tmp_path / "p").readings_ == p.readings_
