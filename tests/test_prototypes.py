"""The Prototypes estimator on synthetic states: fit, verdicts, customisation, persistence."""

import json
import re

import numpy as np
import pytest

from mlpm_guard import Prototypes, Tier
from mlpm_guard.estimator.prototype_file import metadata_digest
from mlpm_guard.estimator.prototypes import check_backbone
from mlpm_guard.vocabulary.errors import (
    BackboneMismatchError,
    ConfigError,
    NotFittedError,
    PrototypeFileError,
)


def make_states(n=300, layers=4, d=12, seed=0):
    """Layer 3 separates the classes well, layer 4 weakly, layers 1-2 not at all."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    H = rng.normal(size=(n, layers, d))
    H[:, 2, 0] += 3.0 * y
    H[:, 3, 1] += 1.0 * y
    return H, y


@pytest.fixture
def fitted():
    H, y = make_states()
    cats = np.where(np.arange(len(y)) % 4 == 1, "Violence", "hate speech")
    return Prototypes(C=0.5).fit(H, y, categories=cats), H, y


def test_fit_keeps_informative_layers_and_predicts(fitted):
    p, H, y = fitted
    assert 3 in p.layer_ids_ and 1 not in p.layer_ids_
    cols = [layer - 1 for layer in p.layer_ids_]
    H2, y2 = make_states(seed=1)
    assert (p.predict(H2[:, cols]) == y2).mean() > 0.9


def test_sklearn_conventions(fitted):
    """predict_proba has one column per class of classes_, score is the mean accuracy."""
    import copy

    from sklearn.base import clone, is_classifier

    p, H, y = fitted
    cols = [layer - 1 for layer in p.layer_ids_]
    proba = p.predict_proba(H[:, cols])
    assert proba.shape == (len(y), 2) and list(p.classes_) == [0, 1]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(p.predict(H[:, cols]), p.classes_[(proba[:, 1] >= p.threshold_).astype(int)])
    assert p.score(H[:, cols], y) == pytest.approx((p.predict(H[:, cols]) == y).mean())
    assert p.score(H[:, cols], ["unsafe" if v else "safe" for v in y]) == p.score(H[:, cols], y)
    assert is_classifier(p) and clone(p).get_params() == p.get_params()
    # The backbone is bound, not fitted: no trailing-underscore attribute, and no copy or pickle carries it.
    bound = Prototypes().fit(H, y, backbone=_FakeBackbone(num_layers=4, hidden_size=12))
    assert bound.backbone is not None
    assert sorted(k for k in vars(bound) if "backbone" in k) == ["_backbone", "backbone_identity_"]
    assert copy.deepcopy(bound).backbone is None and bound.backbone is not None


def test_verdicts_carry_tier_category_and_layer_scores(fitted):
    p, H, y = fitted
    cols = [layer - 1 for layer in p.layer_ids_]
    verdicts = p.verdicts(H[:, cols])
    for v, label in zip(verdicts, y):
        assert 0.0 <= v.p_unsafe <= 1.0
        assert v.label == ("unsafe" if v.p_unsafe >= p.threshold_ else "safe")
        assert set(v.layer_scores) == set(p.layer_ids_)
        if v.tier is Tier.SAFE:
            assert v.category is None
        else:
            assert v.category in ("S1", "S10")  # "Violence" -> S1, "hate speech" -> S10
    assert sum(v.tier is Tier.UNSAFE for v in verdicts) > 100


def test_probability_matches_manual_computation(fitted):
    """Stacked per-layer discriminants through the logistic combination, computed by hand."""
    p, H, _ = fitted
    cols = [layer - 1 for layer in p.layer_ids_]
    s = p.sets_[0]
    feats = []
    for j, c in enumerate(cols):
        d2 = np.array([[(h - m) @ s.precision[j] @ (h - m) for m in s.means[j]] for h in H[:20, c]])
        feats.append(np.exp(-0.5 * d2[:, 1]) / np.exp(-0.5 * d2).sum(axis=1))
    z = np.stack(feats, axis=1) @ p.coef_ + p.intercept_
    np.testing.assert_allclose(p.predict_proba(H[:20, cols])[:, 1], 1 / (1 + np.exp(-z)), rtol=1e-8)


@pytest.mark.parametrize("params,message", [
    ({"C": 0}, "`C` must be a positive number"),
    ({"threshold": 1.5}, "`threshold` must be in"),
    ({"controversial_threshold": 0.9}, "`controversial_threshold` must be in"),
    ({"cv": 1}, "`cv` must be None or an int"),
    ({"source_invariance": -1}, "`source_invariance` must be a number >= 0"),
    ({"other_language_threshold": 0.9}, "`other_language_threshold` must be None or in"),
    ({"other_language_threshold": 0.1}, "`other_language_threshold` must be None or in"),
    ({"content_threshold": 0.9}, "`content_threshold` must be None or in"),
])
def test_invalid_params_fail_at_fit(params, message):
    H, y = make_states(n=40)
    est = Prototypes(**params)  # storing is fine
    with pytest.raises(ConfigError, match=message):
        est.fit(H, y)


def test_not_fitted_and_bad_inputs():
    with pytest.raises(NotFittedError, match="not fitted yet"):
        Prototypes().predict_proba(np.zeros((1, 1, 3)))
    H, y = make_states(n=40)
    with pytest.raises(ConfigError, match="at least 2 safe and 2 unsafe"):
        Prototypes().fit(H, np.ones(len(y)))
    with pytest.raises(ConfigError, match="texts need a backbone"):
        Prototypes().fit(["a", "b"], [0, 1])
    p = Prototypes().fit(H, y)
    with pytest.raises(ConfigError, match="hidden states must have shape"):
        p.predict_proba(np.zeros((2, 7, 12)))


def test_per_source_and_cross_fitting():
    H, y = make_states(n=400)
    sources = np.where(np.arange(400) < 200, "a", "b")
    p = Prototypes(per_source=True, cv=3, min_source_count=20).fit(H, y, sources=sources)
    assert [s.name for s in p.sets_] == ["all", "a", "b"]
    assert p.coef_.shape == (3 * len(p.layer_ids_),)
    cols = [layer - 1 for layer in p.layer_ids_]
    assert (p.predict(H[:, cols]) == y).mean() > 0.9


def test_source_invariance_discounts_what_tells_sources_apart():
    """Axis 0 is a source's style, axis 1 harm: unsafe sources happen to sit further along axis 0, so
    a plain fit leans on style and gets a benign text in an unsafe source's style wrong."""
    rng = np.random.default_rng(0)

    def rows(n, style, harm):
        X = rng.normal(scale=0.5, size=(n, 1, 6))
        X[:, 0, 0] += style
        X[:, 0, 1] += harm
        return X

    H = np.concatenate([rows(200, 0, 0), rows(200, 3, 0), rows(200, 3, 1), rows(200, 6, 1)])
    y = np.repeat([0, 0, 1, 1], 200)
    sources = np.repeat(["a", "b", "c", "d"], 200)
    benign_new_style, harmful_new_style = rows(100, 6, 0), rows(100, 0, 1)
    plain = Prototypes().fit(H, y, sources=sources)
    invariant = Prototypes(source_invariance=3).fit(H, y, sources=sources)
    assert plain.predict(benign_new_style).mean() > 0.6 and plain.predict(harmful_new_style).mean() < 0.3
    assert invariant.predict(benign_new_style).mean() < 0.4 and invariant.predict(harmful_new_style).mean() > 0.6
    # Without sources there is nothing to tell apart: the fit is the plain one.
    np.testing.assert_allclose(Prototypes(source_invariance=3).fit(H, y).predict_proba(H), plain.predict_proba(H))


def test_add_examples_keeps_the_source_invariance_term_as_pooled_scatter():
    """Examples added without a refit merge into the covariance the invariance term is already in:
    the term's scatter is kept whole and, like the rest, spread over the larger sample count."""
    rng = np.random.default_rng(1)
    H = rng.normal(size=(400, 1, 5))
    H[:200, 0, 0] += np.repeat([0.0, 2.0], 100)  # two safe sources apart on axis 0
    H[200:, 0, 1] += 1.5
    y = np.repeat([0, 1], 200)
    sources = np.repeat(["a", "b", "c", "c"], 100)
    plain = Prototypes(layers=[1]).fit(H, y, sources=sources)
    invariant = Prototypes(layers=[1], source_invariance=2).fit(H, y, sources=sources)
    before = invariant.sets_[0].cov - plain.sets_[0].cov
    assert before[0, 0, 0] > 0.1  # the term is there to keep
    n_old = plain.sets_[0].n
    new = rng.normal(size=(30, 1, 5)) + 0.5
    plain.add_examples(new, [0] * 30, name="mine")
    invariant.add_examples(new, [0] * 30, name="mine")
    n_new = invariant.sets_[0].n
    assert n_new == n_old + 30 == plain.sets_[0].n
    np.testing.assert_allclose(invariant.sets_[0].cov - plain.sets_[0].cov, before * (n_old - 1) / (n_new - 1),
                               atol=1e-10)


def test_add_examples_moves_verdicts_near_the_examples_only(fitted):
    p, H, y = fitted
    cols = [layer - 1 for layer in p.layer_ids_]
    rng = np.random.default_rng(5)
    # A tight cluster that the prototypes call unsafe; teach that it is safe.
    centre = H[y == 1][:, cols].mean(axis=0) + 4.0
    cluster = centre + 0.05 * rng.normal(size=(6, *centre.shape))
    before = p.predict_proba(cluster)[:, 1]
    others_before = p.predict_proba(H[:, cols])[:, 1]
    p.add_examples(cluster[:3], ["safe"] * 3)
    after = p.predict_proba(cluster[3:])[:, 1]
    assert (before[3:] > 0.5).all() and (after < 0.5).all()
    others_after = p.predict_proba(H[:, cols])[:, 1]
    assert (others_after <= others_before + 1e-12).all()  # a safe group never raises P(unsafe)
    assert np.abs(others_after - others_before).mean() < 0.05
    assert p.sets_[0].names[-1] == "custom-safe"


def test_add_examples_new_category_is_named(fitted):
    p, H, y = fitted
    cols = [layer - 1 for layer in p.layer_ids_]
    rng = np.random.default_rng(6)
    centre = H[y == 1][:, cols].mean(axis=0) - 6.0
    group = centre + 0.05 * rng.normal(size=(5, *centre.shape))
    p.add_examples(group[:3], ["unsafe"] * 3, category="election misinformation")
    verdicts = p.verdicts(group[3:])
    assert all(v.label == "unsafe" and v.category == "S13" for v in verdicts)
    assert "S13" in p.category_labels_


def test_save_load_round_trip(tmp_path, fitted):
    p, H, _ = fitted
    cols = [layer - 1 for layer in p.layer_ids_]
    p.add_examples(H[:3, cols], ["safe"] * 3, name="faq")
    p.save(tmp_path / "protos")
    # The tensors file is named by its digest: a new save never overwrites the file the old metadata names.
    names = sorted(f.name for f in (tmp_path / "protos").iterdir())
    assert len(names) == 2 and names[1] == "prototypes.json" and re.fullmatch(r"prototypes\.[0-9a-f]{16}\.safetensors", names[0])
    q = Prototypes.load(tmp_path / "protos")
    np.testing.assert_allclose(q.predict_proba(H[:, cols]), p.predict_proba(H[:, cols]), rtol=1e-5, atol=1e-6)
    assert q.get_params() == p.get_params()
    assert q.other_language_threshold is None
    assert q.sets_[0].names == ["safe", "unsafe", "faq"]
    assert [v.category for v in q.verdicts(H[:10, cols])] == [v.category for v in p.verdicts(H[:10, cols])]


def test_a_head_judges_its_own_kind_and_is_saved_with_its_parent(tmp_path, fitted):
    p, H, y = fitted
    head = Prototypes(C=0.5).fit(*make_states(seed=1))
    assert p.for_kind("answer") is p  # no head: the prototypes judge every kind
    p.set_head("answer", head)
    assert p.for_kind("answer") is head and p.for_kind("request") is p and p.for_kind("content") is p
    folder = p.save(tmp_path / "protos")
    [saved] = (folder / "heads").iterdir()
    assert re.fullmatch(r"answer-[0-9a-f]{16}", saved.name)
    q = Prototypes.load(folder)
    cols = [layer - 1 for layer in head.layer_ids_]
    np.testing.assert_allclose(q.for_kind("answer").predict_proba(H[:, cols]), head.predict_proba(H[:, cols]),
                               rtol=1e-5, atol=1e-6)
    # A second save replaces the head folder once the new metadata names the new one.
    p.set_head("answer", Prototypes(C=0.5).fit(*make_states(seed=2)))
    p.save(folder)
    assert [f.name for f in (folder / "heads").iterdir()] != [saved.name] and len(list((folder / "heads").iterdir())) == 1


def test_an_edited_or_missing_head_is_refused(tmp_path, fitted):
    p, _, _ = fitted
    p.set_head("answer", Prototypes(C=0.5).fit(*make_states(seed=1)))
    folder = p.save(tmp_path / "protos")
    [head] = (folder / "heads").iterdir()
    meta = json.loads((head / "prototypes.json").read_text())
    forged = {**meta, "threshold": 0.99}
    (head / "prototypes.json").write_text(json.dumps({**forged, "metadata_sha256": metadata_digest(forged)}))
    with pytest.raises(PrototypeFileError, match="is not the answer head"):
        Prototypes.load(folder)
    import shutil

    shutil.rmtree(head)
    with pytest.raises(PrototypeFileError, match="answer head .* is missing"):
        Prototypes.load(folder)


def test_a_head_must_be_plain_prototypes_of_a_known_kind(fitted):
    p, _, _ = fitted
    head = Prototypes(C=0.5).fit(*make_states(seed=1))
    with pytest.raises(ConfigError, match="a head judges one of"):
        p.set_head("request", head)
    nested = Prototypes(C=0.5).fit(*make_states(seed=2)).set_head("answer", Prototypes(C=0.5).fit(*make_states(seed=3)))
    with pytest.raises(ConfigError, match="heads of its own"):
        p.set_head("answer", nested)


def test_every_covariance_comes_back_exactly_as_float32_holds_it(tmp_path):
    # Saved as its upper triangle; safetensors writes a buffer as it lies in memory, so a strided
    # array (the triangles of several readings) once came back scrambled.
    H, y = make_states(layers=4, d=20)
    p = Prototypes(C=100.0).fit(H, y)
    assert len(p.readings_) > 1
    q = Prototypes.load(p.save(tmp_path / "protos"))
    np.testing.assert_array_equal(q.sets_[0].cov, p.sets_[0].cov.astype(np.float32).astype(np.float64))


def test_the_fit_params_are_saved_with_the_prototypes(tmp_path):
    H, y = make_states()
    p = Prototypes(threshold=0.8, controversial_threshold=0.35, other_language_threshold=0.7,
                   source_invariance=3).fit(H, y)
    q = Prototypes.load(p.save(tmp_path / "protos"))
    assert q.get_params()["other_language_threshold"] == 0.7
    assert q.get_params()["source_invariance"] == 3


def test_load_errors_are_clear(tmp_path, fitted):
    p, _, _ = fitted
    folder = p.save(tmp_path / "protos")
    [tensors] = folder.glob("*.safetensors")
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrototypeFileError, match="does not match prototypes.json"):
        Prototypes.load(folder)
    tensors.write_bytes(data)
    meta = json.loads((folder / "prototypes.json").read_text())
    # Issue 14: a missing digest used to switch the check off (a bit-flipped tensors file then loaded).
    for key in ("tensors_sha256", "metadata_sha256"):
        (folder / "prototypes.json").write_text(json.dumps({**meta, key: None}))
        with pytest.raises(PrototypeFileError, match=key):
            Prototypes.load(folder)
    (folder / "prototypes.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(PrototypeFileError, match="newer than this mlpm-guard"):
        Prototypes.load(folder)
    (folder / "prototypes.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(PrototypeFileError, match="older mlpm-guard"):
        Prototypes.load(folder)
    (folder / "prototypes.json").write_text("{not json")
    with pytest.raises(PrototypeFileError, match="corrupted"):
        Prototypes.load(folder)
    (folder / "prototypes.json").write_text(json.dumps({**meta, "threshold": 0.4}))
    with pytest.raises(PrototypeFileError, match="changed after it was saved"):
        Prototypes.load(folder)
    forged = {**meta, "layer_ids": [1, 2, 3]}
    (folder / "prototypes.json").write_text(json.dumps({**forged, "metadata_sha256": metadata_digest(forged)}))
    with pytest.raises(PrototypeFileError, match="read exactly layer_ids"):
        Prototypes.load(folder)
    forged = {**meta, "layer_ids": [1, 2, 3], "readings": None}  # a version-2 file reads each layer's last token
    (folder / "prototypes.json").write_text(json.dumps({**forged, "metadata_sha256": metadata_digest(forged)}))
    with pytest.raises(PrototypeFileError, match="disagree"):
        Prototypes.load(folder)
    with pytest.raises(PrototypeFileError, match="is not a prototypes folder"):
        Prototypes.load(tmp_path / "nowhere")


def test_save_is_atomic(tmp_path, fitted, monkeypatch):
    """A save that dies half-way leaves the previous files intact and no temp files behind."""
    p, H, _ = fitted
    folder = p.save(tmp_path / "protos")
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    import mlpm_guard._io as io

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        p.save(folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


class _FakeBackbone:
    def __init__(self, **changes):
        self.name = "fake"
        self._ident = {"name": "fake", "model": "fake", "model_type": "llama", "num_layers": 4, "hidden_size": 12,
                       "vocab_size": 100, "chat_template_hash": "abc", "weights_probe": [0.1, -0.2, 0.3], **changes}

    def identity(self):
        return dict(self._ident)


def test_backbone_mismatch_is_refused(tmp_path):
    H, y = make_states()
    p = Prototypes().fit(H, y, backbone=_FakeBackbone())
    p.save(tmp_path / "p")
    Prototypes.load(tmp_path / "p", backbone=_FakeBackbone())  # same backbone loads
    Prototypes.load(tmp_path / "p", backbone=_FakeBackbone(weights_probe=[0.1001, -0.2, 0.3]))  # bf16 rounding
    for change, message in [({"hidden_size": 64}, "hidden_size"), ({"chat_template_hash": "xyz"}, "chat_template"),
                            ({"weights_probe": [0.5, 0.5, 0.5]}, "weights differ")]:
        with pytest.raises(BackboneMismatchError, match=message):
            Prototypes.load(tmp_path / "p", backbone=_FakeBackbone(**change))


def test_a_recorded_weights_probe_of_another_length_is_a_mismatch_not_a_crash():
    # An edited prototypes file can record any list; the fuzz test found [] crashing numpy's allclose.
    ident = _FakeBackbone().identity()
    for probe in ([], [0.1, -0.2, 0.3, 0.4]):
        with pytest.raises(BackboneMismatchError, match="weights differ"):
            check_backbone({**ident, "weights_probe": probe}, _FakeBackbone())
