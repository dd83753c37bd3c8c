"""Ray on a local instance (2 CPUs): `fit|eval --engine ray` (Ray Data, 2 actors) gives the local
engine's results bit for bit, and the Ray Serve deployment answers the openai client."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from conftest import SMALL_SAFE, SMALL_UNSAFE, write_jsonl  # noqa: E402

from mlpm_guard import Backbone, Guard, Prototypes, cli  # noqa: E402
from mlpm_guard.toolkit import ray_engine  # noqa: E402
from mlpm_guard.toolkit.features import FeatureCache  # noqa: E402

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


@pytest.mark.parametrize("pooling", ["last", "last+mean"])
def test_fit_and_eval_with_ray_match_the_local_engine(local_ray, tiny_folder, files, tmp_path, monkeypatch, spy,
                                                      pooling):
    """fit without the cache (states straight to the fit), eval with it (states through a fresh cache),
    with the last-layer baseline so the cached depth reaches the last layer; pooled readings too."""
    root, train, first, second = files
    results = {}
    for engine in ("local", "ray"):
        out, cache = tmp_path / engine, tmp_path / f"{engine}-cache"
        flags = ["--backbone", tiny_folder, "--dtype", "float32", "-q", "--engine", engine, "--ray-actors", "2"]
        _cli(["fit", train, "--out", str(out / "protos"), "--no-seed-set", "--no-cache", "--pooling", pooling, *flags],
             cache, monkeypatch)
        _cli(["eval", first, second, "--prototypes", str(out / "protos"), "--out", str(out / "eval"), "--no-plots",
              "--baselines", "last_layer", *flags], cache, monkeypatch)
        results[engine] = (json.loads((out / "protos" / "prototypes.json").read_text()),
                           json.loads((out / "eval" / "metrics.json").read_text()))
        assert len(spy) == (0 if engine == "local" else 2)
    assert all(s.actors == 2 and s.prompts > 0 for s in spy)
    (lp, lm), (rp, rm) = results["local"], results["ray"]
    assert rp["tensors_sha256"] == lp["tensors_sha256"] and rp["params"]["pooling"] == pooling
    assert (rp["threshold"], rp["intercept"], rp["n_samples"]) == (lp["threshold"], lp["intercept"], lp["n_samples"])
    assert rm == lm
    # Ray filled the cache with what the local engine stores there, entry for entry.
    backbone = Backbone(tiny_folder, dtype="float32")
    sizes = []
    for engine in ("local", "ray"):
        monkeypatch.setenv("MLPM_GUARD_CACHE", str(tmp_path / f"{engine}-cache"))
        sizes.append(len(FeatureCache.for_backbone(backbone)))
    assert sizes[0] == sizes[1] > 16


def test_ray_serve_deployment_answers_the_openai_client(local_ray, tiny_folder, tmp_path):
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from ray import serve

    from mlpm_guard.server.ray_serve import app_builder

    backbone = Backbone(tiny_folder, dtype="float32")
    labels = [0] * len(SMALL_SAFE) + [1] * len(SMALL_UNSAFE)
    protos = Prototypes(C=1.0).fit(SMALL_SAFE + SMALL_UNSAFE, labels, backbone=backbone).save(tmp_path / "protos")
    policy = tmp_path / "policy.yaml"
    policy.write_text("safe_route: pass\ncontroversial_route: pass\nunsafe_route: pass\nallow_pass_for_unsafe: true\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"backbone": tiny_folder, "dtype": "float32", "prototypes": str(protos), "policy": str(policy),
            "max_new_tokens": 8, "server": {"max_batch_size": 8, "max_wait_ms": 100}}
    try:
        serve.run(app_builder(args), name="mlpm-guard", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Write a haiku about the sea."}]
        reply = oa.chat.completions.create(model="m", messages=messages, max_tokens=6)
        assert reply.choices[0].message.content and reply.model_extra["mlpm_guard"]["route"] == "pass"
        chunks = list(oa.chat.completions.create(model="m", messages=messages, max_tokens=6, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            reply.choices[0].message.content
        texts = [f"Question {i}: what is {i} times {i}?" for i in range(6)]
        mod = oa.moderations.create(input=texts)
        local = Guard(backbone, Prototypes.load(protos, backbone=backbone), str(policy)).check_batch(texts)
        assert [r.model_extra["mlpm_guard"]["p_unsafe"] for r in mod.results] == \
            pytest.approx([v.p_unsafe for v in local], abs=1e-4)
        metrics = httpx.get(f"{url}/metrics").text
        count = float(metrics.split('mlpm_guard_batch_size_count{lane="score"} ')[1].split()[0])
        total = float(metrics.split('mlpm_guard_batch_size_sum{lane="score"} ')[1].split()[0])
        assert total == 6 and count < 6  # serve.batch put the six inputs of one request into shared batches
    finally:
        serve.shutdown()


def test_the_documented_serve_config_is_valid():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from mlpm_guard.server.ray_serve import GuardArgs
    from mlpm_guard.server.settings import ServerSettings

    config = yaml.safe_load((Path(__file__).parents[1] / "docs" / "ray-serve.yaml").read_text())
    ServeDeploySchema(**config)
    app = config["applications"][0]
    args = GuardArgs(**app["args"])
    assert ServerSettings(**args.server).host == "127.0.0.1" and config["http_options"]["host"] == "127.0.0.1"
    assert app["import_path"] == "mlpm_guard.server.ray_serve:app_builder"
