"""`fit|eval --engine ray`: Ray Data extraction on a local Ray instance (2 CPUs, 2 actors) gives the
local engine's results, bit for bit, on a small saved model."""

from __future__ import annotations

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from mlpm_guard import Backbone, cli, ray_engine  # noqa: E402
from mlpm_guard.features import FeatureCache  # noqa: E402

from conftest import SMALL_SAFE, SMALL_UNSAFE, write_jsonl  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_backbone):
    """The tiny random Llama saved as a model folder, so every actor can load it by path."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_backbone.model.save_pretrained(folder)
    tiny_backbone.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-data")
    train = write_jsonl(folder / "train.jsonl", [{"prompt": p, "label": "safe", "source": "a"} for p in SMALL_SAFE]
                        + [{"prompt": p, "label": "unsafe", "source": "a", "category": "weapons"} for p in SMALL_UNSAFE])
    first = write_jsonl(folder / "first.jsonl", [{"prompt": f"{p} Please be brief.", "label": lab}
                                                 for p, lab in zip(SMALL_SAFE[:8] + SMALL_UNSAFE[:8],
                                                                   ["safe"] * 8 + ["unsafe"] * 8)])
    # Half of them are in the first file too: the second extract call finds those in the cache.
    second = write_jsonl(folder / "second.jsonl", [{"prompt": f"{p} Please be brief.", "label": lab}
                                                   for p, lab in zip(SMALL_SAFE[4:12] + SMALL_UNSAFE[4:12],
                                                                     ["safe"] * 8 + ["unsafe"] * 8)])
    return folder, str(train), str(first), str(second)


def test_ray_extraction_equals_the_local_forward_passes(local_ray, tiny_folder):
    backbone = Backbone(tiny_folder, dtype="float32")
    prompts = SMALL_SAFE + SMALL_UNSAFE
    states, stats = ray_engine.extract(backbone, prompts, [2, 4], ray_engine.RayOptions(actors=2))
    expected = backbone.last_token_states(backbone.encode(prompts), [2, 4])
    np.testing.assert_array_equal(states, expected)
    assert stats.actors == 2 and stats.prompts == len(prompts) and stats.batches > 2


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = ray_engine.run_batches

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out[1])
        return out

    monkeypatch.setattr(ray_engine, "run_batches", counted)
    return calls


def _cli(args, cache_root, monkeypatch):
    monkeypatch.setenv("MLPM_GUARD_CACHE", str(cache_root))
    assert cli.main(args) == 0


def test_fit_and_eval_with_ray_match_the_local_engine(local_ray, tiny_folder, files, tmp_path, monkeypatch, spy):
    """fit without the cache (states straight to the fit), eval with it (states through a fresh cache),
    with the last-layer baseline so the cached depth reaches the last layer."""
    root, train, first, second = files
    results = {}
    for engine in ("local", "ray"):
        out, cache = tmp_path / engine, tmp_path / f"{engine}-cache"
        flags = ["--backbone", tiny_folder, "--dtype", "float32", "-q", "--engine", engine, "--ray-actors", "2"]
        _cli(["fit", train, "--out", str(out / "protos"), "--no-seed-set", "--no-cache", *flags], cache, monkeypatch)
        _cli(["eval", first, second, "--prototypes", str(out / "protos"), "--out", str(out / "eval"), "--no-plots",
              "--baselines", "last_layer", *flags], cache, monkeypatch)
        results[engine] = (json.loads((out / "protos" / "prototypes.json").read_text()),
                           json.loads((out / "eval" / "metrics.json").read_text()))
        assert len(spy) == (0 if engine == "local" else 2)
    assert all(s.actors == 2 and s.prompts > 0 for s in spy)
    (lp, lm), (rp, rm) = results["local"], results["ray"]
    assert rp["tensors_sha256"] == lp["tensors_sha256"]
    assert (rp["threshold"], rp["intercept"], rp["n_samples"]) == (lp["threshold"], lp["intercept"], lp["n_samples"])
    assert rm == lm
    # Ray filled the cache with what the local engine stores there, entry for entry.
    backbone = Backbone(tiny_folder, dtype="float32")
    sizes = []
    for engine in ("local", "ray"):
        monkeypatch.setenv("MLPM_GUARD_CACHE", str(tmp_path / f"{engine}-cache"))
        sizes.append(len(FeatureCache.for_backbone(backbone)))
    assert sizes[0] == sizes[1] > 16
