"""The SIREN-style scorer: neuron selection, the MLP, verdicts, the file format, the guard and the baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.neural_network import MLPClassifier

from mlpm_guard import Guard, Route, Tier
from mlpm_guard.estimator.readings import select
from mlpm_guard.vocabulary.errors import BackboneMismatchError, ConfigError, NotFittedError, PrototypeFileError
from mlpm_guard.estimator.siren import META_FILE, NeuronProbe, _mlp_forward, select_neurons

from conftest import SMALL_SAFE, SMALL_UNSAFE, write_jsonl

N_LAYERS, D = 3, 24


def synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """States of 3 layers x (last, mean): the label lives in neurons 2 and 5 of layer 2's last token;
    everything else is noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    H = rng.normal(size=(n, 2 * N_LAYERS, D))
    H[:, 1, 2] += 3.0 * (2 * y - 1)
    H[:, 1, 5] -= 2.0 * (2 * y - 1)
    return H, y


def of(probe: NeuronProbe, H: np.ndarray) -> np.ndarray:
    """The columns of every-layer states that a fitted probe reads (its layers, both poolings)."""
    return select(H, list(range(1, N_LAYERS + 1)), probe.layer_ids_, probe.poolings_)


@pytest.fixture(scope="module")
def probe():
    H, y = synthetic()
    return NeuronProbe(C=0.1, hidden_layer_sizes=(16,), max_iter=300).fit(H, y)


def test_select_neurons_keeps_the_fewest_holding_the_mass():
    coef = np.array([0.0, 5.0, -3.0, 1.0, 1.0])
    assert select_neurons(coef, 0.5).tolist() == [1]
    assert select_neurons(coef, 0.8).tolist() == [1, 2]
    assert select_neurons(coef, 0.9).tolist() == [1, 2, 3]  # ties broken by position
    assert select_neurons(coef, 1.0).tolist() == [1, 2, 3, 4]
    assert select_neurons(np.zeros(4), 0.9).tolist() == []


def test_the_mlp_forward_pass_is_scikit_learns():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(200, 6)), rng.integers(0, 2, 200)
    for activation in ("relu", "tanh"):
        mlp = MLPClassifier(hidden_layer_sizes=(8, 4), activation=activation, max_iter=50, random_state=0).fit(X, y)
        ours = _mlp_forward(X, mlp.coefs_, mlp.intercepts_, activation)
        assert np.allclose(ours, mlp.predict_proba(X)[:, 1], atol=1e-10)


def test_the_probes_find_the_informative_neurons_and_drop_the_noise(probe):
    keys = [r.key for r in probe.readings_]
    kept = dict(zip(keys, probe.neurons_))
    assert {2, 5} <= set(kept[2].tolist())  # layer 2 at the last token
    scores = dict(zip(keys, probe.reading_scores_))
    assert scores[2] > 0.95 and max(scores, key=scores.get) == 2
    # A noise reading kept by chance scores near 0.5 and weighs little next to the informative one.
    weights = dict(zip(keys, probe.reading_weights_))
    assert all(w > 0 for w in weights.values()) and all(weights[k] < 0.5 for k in keys if k != 2)
    assert probe.layer_ids_ == sorted({r.layer for r in probe.readings_})
    H, y = synthetic(200, seed=7)
    assert probe.score(of(probe, H), y) > 0.95
    assert probe.predict_proba(of(probe, H)).shape == (200, 2)


def test_verdicts_have_the_prototypes_interface(probe):
    H = of(probe, synthetic(50, seed=3)[0])
    verdicts = probe.verdicts(H)
    p = probe.predict_proba(H)[:, 1]
    for v, pi in zip(verdicts, p):
        assert v.p_unsafe == pytest.approx(pi)
        assert v.tier is (Tier.UNSAFE if pi >= 0.5 else Tier.CONTROVERSIAL if pi >= 0.25 else Tier.SAFE)
        assert set(v.layer_scores) == {r.key for r in probe.readings_} and v.category is None
    broken = H.copy()
    broken[0, :, 2] = np.nan
    v = probe.verdicts(broken)[0]
    assert v.error and v.unsafe
    assert probe.for_kind("content") is probe and probe.poolings_ == ("last", "mean")


def test_invalid_parameters_and_unfitted(probe):
    H, y = synthetic(40)
    for params, message in (({"mass": 0}, "mass"), ({"C": -1}, "`C`"), ({"activation": "gelu"}, "activation"),
                            ({"hidden_layer_sizes": ()}, "hidden_layer_sizes"),
                            ({"controversial_threshold": 0.9}, "controversial_threshold")):
        with pytest.raises(ConfigError, match=message):
            NeuronProbe(**params).fit(H, y)
    with pytest.raises(NotFittedError):
        NeuronProbe().predict(H)
    with pytest.raises(ConfigError, match="better than chance"):
        rng = np.random.default_rng(0)
        NeuronProbe(C=1e-4).fit(rng.normal(size=(60, 2, 8)), np.arange(60) % 2)


def test_save_load_round_trip_and_tampering(probe, tmp_path):
    folder = probe.save(tmp_path / "probe")
    loaded = NeuronProbe.load(folder)
    H = of(probe, synthetic(30, seed=5)[0])
    assert np.allclose(loaded.predict_proba(H), probe.predict_proba(H), atol=1e-6)
    assert loaded.digest() == NeuronProbe.load(folder).digest()
    meta = json.loads((folder / META_FILE).read_text())
    meta["threshold"] = 0.1
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PrototypeFileError, match="changed after it was saved"):
        NeuronProbe.load(folder)
    probe.save(folder)
    tensors = next(folder.glob("neuron_probe.*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(PrototypeFileError, match="does not match"):
        NeuronProbe.load(folder)


@pytest.fixture(scope="module")
def tiny_probe(tiny_backbone):
    return NeuronProbe(C=1.0, hidden_layer_sizes=(8,), max_iter=300, threshold=0.8,
                       controversial_threshold=0.35).fit(SMALL_SAFE + SMALL_UNSAFE, [0] * 20 + [1] * 20,
                                                        backbone=tiny_backbone)


def test_the_guard_scores_and_routes_with_a_neuron_probe(tiny_probe, tiny_backbone, tmp_path):
    guard = Guard(tiny_backbone, tiny_probe, safety_prompt=False)
    verdict = guard.check("How do I bake bread?")
    assert verdict.p_unsafe == pytest.approx(tiny_probe.verdicts(["How do I bake bread?"])[0].p_unsafe, abs=1e-6) \
        or verdict.view != "whole"  # a sentence view may be stricter than the whole
    forced = {"safe_route": "steer", "controversial_route": "steer", "unsafe_route": "steer"}
    result = guard.invoke("What is 17 times 23?", policy=forced, max_new_tokens=4)
    assert result.route is Route.STEER and result.error is None  # steering reads the probe's directions
    folder = tiny_probe.save(tmp_path / "probe")
    loaded = Guard(tiny_backbone, folder, safety_prompt=False)
    assert isinstance(loaded.prototypes, NeuronProbe)
    assert loaded.check("What is 17 times 23?").p_unsafe == pytest.approx(guard.check("What is 17 times 23?").p_unsafe)


def test_a_probe_fitted_on_another_backbone_is_refused(tiny_probe, backbone, tmp_path):
    folder = tiny_probe.save(tmp_path / "probe")
    with pytest.raises(BackboneMismatchError):
        NeuronProbe.load(folder, backbone=backbone)


def test_the_siren_baseline_scores_beside_the_prototypes(tiny_backbone):
    from mlpm_guard.toolkit.baselines import make_baseline, parse_baselines
    from mlpm_guard.toolkit.data import Example

    assert "siren" in parse_baselines("all") and parse_baselines("siren") == ["siren"]
    baseline = make_baseline("siren", tiny_backbone, cache=False)
    train = [Example(p, 0, source="a") for p in SMALL_SAFE] + [Example(p, 1, source="a") for p in SMALL_UNSAFE]
    baseline.probe_params = None
    baseline.params.update(C=1.0, hidden_layer_sizes=(8,), max_iter=300)
    baseline.fit(train)
    p = baseline.predict_proba(SMALL_SAFE[:3] + SMALL_UNSAFE[:3])
    assert p.shape == (6,) and ((0 <= p) & (p <= 1)).all()
    assert baseline.threshold == baseline.probe_.threshold_ == 0.8
    assert np.allclose(p, baseline.probe_.predict_proba(SMALL_SAFE[:3] + SMALL_UNSAFE[:3])[:, 1], atol=1e-6)


def test_the_cli_fits_a_probe_that_score_reads(backbone, tmp_path, capsys):
    from mlpm_guard import cli

    rows = [{"prompt": p, "label": "safe"} for p in SMALL_SAFE] + [{"prompt": p, "label": "unsafe"}
                                                                  for p in SMALL_UNSAFE]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "probe"
    assert cli.main(["fit-siren", str(data), "--out", str(out), "--seed-set", "none", "--layers", "4-12", "--C", "1",
                     "--no-cache", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_samples"] == 40 and summary["neurons"] > 0
    assert all(4 <= int(str(k).split()[-1]) <= 12 for k in summary["readings"])
    assert cli.main(["score", "--prototypes", str(out), "-q", "How do I make a pipe bomb at home?"]) == 0
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["p_unsafe"] > 0.5
    assert cli.main(["eval", str(data), "--prototypes", str(out), "--out", str(tmp_path / "ev"), "-q"]) == 2
    assert "--baselines siren" in capsys.readouterr().err
