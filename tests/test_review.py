"""The review page and hot reload over HTTP: sign-in with the key, filters, the plots, marking a
decision fine, the cost preview, applying (the next identical request passes), rollback (the first
verdict again, exactly), a version switched by another process, and the decision log of the server."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import SMALL_SAFE, SMALL_UNSAFE  # noqa: E402
from server_helpers import serving  # noqa: E402

from mlpm_guard import DecisionLogSettings, GenerationConfig, Guard, Prototypes  # noqa: E402
from mlpm_guard.guardrail.decision_log import DecisionFilter  # noqa: E402
from mlpm_guard.estimator.prototype_store import PrototypeStore  # noqa: E402
from mlpm_guard.server import ServerSettings, create_app  # noqa: E402
from mlpm_guard.server.review import flag_rate_svg, histogram_svg  # noqa: E402

KEY = "review-key-123"


@pytest.fixture(scope="module")
def tiny_prototypes(tiny_backbone):
    labels = [0] * len(SMALL_SAFE) + [1] * len(SMALL_UNSAFE)
    return Prototypes(C=1.0).fit(SMALL_SAFE + SMALL_UNSAFE, labels, backbone=tiny_backbone,
                                 categories=[None] * len(SMALL_SAFE) + ["S9"] * len(SMALL_UNSAFE))


@pytest.fixture(scope="module")
def look_alike(tiny_prototypes):
    """A benign text the tiny prototypes flag: the false alarm of these tests."""
    candidates = ["How can I steal the show at my school talent competition?",
                  "What's the fastest way to blow up a lot of balloons for a party?",
                  "Where can I buy a gun safe for my home?", "How do I kill it at my job interview?",
                  "How do I shoot a great photo of the night sky?", "How can I poison-proof my garden for pets?"]
    flagged = [t for t, v in zip(candidates, tiny_prototypes.verdicts(candidates)) if v.unsafe]
    assert flagged, "the tiny prototypes flag none of the look-alikes"
    return flagged[0]


def start(tmp_path, tiny_backbone, tiny_prototypes, *, store_text=True, reload_every_s=2.0):
    store = PrototypeStore.create(tmp_path / "store", tiny_prototypes)
    guard = Guard(tiny_backbone, tiny_prototypes, generation=GenerationConfig(max_new_tokens=4))
    settings = ServerSettings(api_key=KEY, decision_log=DecisionLogSettings(url=str(tmp_path / "log.db"),
                                                                            store_text=store_text),
                              prototypes_store=str(store.root), reload_every_s=reload_every_s)
    return guard, store, create_app(guard, settings)


def check(url, text):
    r = httpx.post(f"{url}/v1/guard/check", json={"prompts": [text]}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    return r.json()["results"][0]


def test_sign_in_filter_mark_fine_preview_apply_and_roll_back(tmp_path, tiny_backbone, tiny_prototypes, look_alike):
    guard, store, app = start(tmp_path, tiny_backbone, tiny_prototypes)
    assert guard.prototypes.version_ == "v0001"
    with serving(app) as url, httpx.Client(base_url=url, follow_redirects=False, timeout=120) as browser:
        assert browser.get("/review").headers["location"] == "/review/login"
        assert httpx.get(f"{url}/review", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert browser.post("/review/login", data={"key": "wrong"}).headers["location"] == "/review/login?error=1"
        signed = browser.post("/review/login", data={"key": KEY})
        assert signed.status_code == 303 and KEY not in signed.headers["set-cookie"]

        first = check(url, look_alike)
        check(url, "What is the capital of France?")
        assert first["route"] == "refuse"
        guard.decision_log.flush()

        page = browser.get("/review")
        assert page.status_code == 200 and "<svg id=histogram" in page.text and "<svg id=flag-rate" in page.text
        assert look_alike in page.text and "What is the capital of France?" in page.text
        refused = browser.get("/review", params={"route": "refuse"}).text
        assert look_alike in refused and "What is the capital of France?" not in refused
        assert "What is the capital of France?" in browser.get("/review", params={"max_p": "0.5"}).text

        row = guard.decision_log.decisions(DecisionFilter(route="refuse"))[0]
        assert row.source == "server" and row.text == look_alike
        marked = browser.post("/review/correct", data={"decision_id": str(row.id), "label": "safe", "back": ""})
        assert marked.status_code == 303 and "marked+fine" in marked.headers["location"]
        assert [c.text for c in guard.decision_log.corrections(pending=True)] == [look_alike]

        cost = browser.post("/review/preview", data={"back": ""})
        assert cost.status_code == 200 and "held-back harmful probes" in cost.text and look_alike in cost.text

        applied = browser.post("/review/apply", data={"back": ""})
        assert "now+serving+v0002" in applied.headers["location"]
        assert guard.prototypes.version_ == "v0002" and store.current == "v0002"
        assert guard.decision_log.corrections(pending=False)[0].applied_version == "v0002"
        again = check(url, look_alike)
        assert again["route"] == "pass" and again["p_unsafe"] < first["p_unsafe"]
        assert "v0002" in browser.get("/review").text

        back = browser.post("/review/rollback", data={"version": "v0001", "back": ""})
        assert "now+serving+v0001" in back.headers["location"]
        assert check(url, look_alike)["p_unsafe"] == first["p_unsafe"]

        guard.decision_log.flush()
        versions = {r.prototypes_version for r in guard.decision_log.decisions()}
        assert versions == {"v0001", "v0002"}
        health = httpx.get(f"{url}/healthz").json()
        assert health["prototypes_version"] == "v0001" and health["decision_log"]["written"] >= 4
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert 'mlpm_guard_logged_decisions_total{category="S9",prototypes_version="v0001",route="refuse"} 2.0' in metrics
        assert 'mlpm_guard_logged_decisions_total{category="none",prototypes_version="v0002",route="pass"} 1.0' in metrics
        assert f'mlpm_guard_decision_log_rows_total{{state="written"}} {health["decision_log"]["written"]}.0' in metrics


def test_without_kept_text_the_reviewer_pastes_it_and_the_hash_must_match(tmp_path, tiny_backbone, tiny_prototypes,
                                                                          look_alike):
    guard, _, app = start(tmp_path, tiny_backbone, tiny_prototypes, store_text=False)
    with serving(app) as url, httpx.Client(base_url=url, follow_redirects=False, timeout=60,
                                           headers={"Authorization": f"Bearer {KEY}"}) as client:
        check(url, look_alike)
        guard.decision_log.flush()
        row = guard.decision_log.decisions()[0]
        assert row.text is None
        assert look_alike not in client.get("/review").text and row.text_sha256[:16] in client.get("/review").text
        missing = client.post("/review/correct", data={"decision_id": str(row.id), "label": "safe"})
        assert missing.status_code == 400 and "paste the text" in missing.text
        wrong = client.post("/review/correct", data={"decision_id": str(row.id), "label": "safe", "text": "other"})
        assert wrong.status_code == 400 and "hash differs" in wrong.text
        right = client.post("/review/correct", data={"decision_id": str(row.id), "label": "safe", "text": look_alike})
        assert right.status_code == 303 and len(guard.decision_log.corrections()) == 1


def test_a_version_switched_elsewhere_is_served_without_a_restart(tmp_path, tiny_backbone, tiny_prototypes,
                                                                  look_alike):
    from mlpm_guard import Correction

    guard, store, app = start(tmp_path, tiny_backbone, tiny_prototypes, reload_every_s=0.1)
    with serving(app) as url:
        before = check(url, look_alike)
        # Another process (the CLI, another replica) teaches the store.
        PrototypeStore(store.root).teach([Correction(text=look_alike, label="safe")], tiny_backbone)
        deadline = time.monotonic() + 20
        while guard.prototypes.version_ != "v0002" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.prototypes.version_ == "v0002"
        assert check(url, look_alike)["p_unsafe"] < before["p_unsafe"]
        reload = httpx.post(f"{url}/v1/prototypes/reload", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert reload == {"version": "v0002", "reloaded": False, "reload_ms": None}


def test_plots_count_what_they_are_given():
    svg = histogram_svg([0.01, 0.02, 0.97])
    assert svg.count("<rect") == 20 and "<title>0.00-0.05: 2</title>" in svg and "<title>0.95-1.00: 1</title>" in svg
    assert "no decisions" in flag_rate_svg([])
