"""The trained safety prompt (DRO): soft tokens in a prefill, the fit, the file format, the route."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from mlpm_guard import Guard, Policy, Prototypes, Route
from mlpm_guard.vocabulary.errors import BackboneMismatchError, ConfigError, NotFittedError, PrototypeFileError
from mlpm_guard.model.generation import SoftTokens, embed_inputs, prefill
from mlpm_guard.model.safety_prompt import (
    META_FILE,
    SafetyPrompt,
    as_safety_prompt,
    estimate_anchor,
    final_states,
    soft_layout,
)

from conftest import SMALL_SAFE, SMALL_UNSAFE

PROMPTS = SMALL_SAFE[:8] + SMALL_UNSAFE[:8]
LABELS = [0] * 8 + [1] * 8
ALL_SAFETY_PROMPT = {"safe_route": "safety_prompt", "controversial_route": "safety_prompt",
                     "unsafe_route": "safety_prompt"}


@pytest.fixture
def odd_refusals(monkeypatch):
    """A random backbone never declines; count an answer of odd length as a refusal so the anchor
    has both kinds to learn the refusal direction from."""
    monkeypatch.setattr("mlpm_guard.model.safety_prompt.is_refusal", lambda text: len(text) % 2 == 1)


@pytest.fixture
def fitted(tiny_backbone, odd_refusals):
    return SafetyPrompt(n_tokens=6, epochs=3, max_new_tokens=5, learning_rate=0.05, batch_size=8,
                        elicit_prompts=[None, "Refuse harmful requests."]).fit(PROMPTS, LABELS,
                                                                              backbone=tiny_backbone, progress=False)


def test_soft_tokens_equal_to_a_texts_embeddings_give_the_prefill_of_that_text(tiny_backbone):
    text = "Be safe and kind."
    ids = tiny_backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = ["What is 2 + 2?", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                  {"role": "user", "content": "Tell me a much longer story about a dragon, please."}]]
    plain = tiny_backbone.encode(prompts, system=text)
    rows, starts = soft_layout(tiny_backbone, prompts, len(ids))
    for p, r, s in zip(plain, rows, starts):
        assert len(p) == len(r) and p.ids[:s] == r.ids[:s] and p.ids[s + len(ids):] == r.ids[s + len(ids):]
        assert list(p.ids[s:s + len(ids)]) == ids  # the placeholders sit exactly where the text's tokens were
    weight = tiny_backbone.model.get_input_embeddings().weight
    soft = SoftTokens(weight[torch.tensor(ids)].detach(), starts)
    a, b = prefill(tiny_backbone, plain), prefill(tiny_backbone, rows, soft=soft)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    h_plain, _, _ = final_states(tiny_backbone, plain)
    h_soft, _, _ = final_states(tiny_backbone, rows, soft)
    assert torch.allclose(h_plain, h_soft, atol=1e-5)


def test_soft_tokens_before_a_text_take_the_place_of_a_mark_the_text_follows(tiny_backbone):
    text = "Be safe and kind."
    prompts = ["What is 2 + 2?", [{"role": "system", "content": "You answer in French."},
                                  {"role": "user", "content": "Hi"}]]
    rows, starts = soft_layout(tiny_backbone, prompts, 4, text=text)
    marked = tiny_backbone.encode(prompts, system=f"A\n\n{text}")
    for r, m, s in zip(rows, marked, starts):
        assert r.ids[:s] == m.ids[:s] and r.ids[s + 4:] == m.ids[s + 1:]
        assert set(r.ids[s:s + 4]) == {tiny_backbone.tokenizer.pad_token_id}
        assert tiny_backbone.tokenizer.decode(r.ids[s + 4:]).lstrip().startswith(text)
    assert "You answer in French." in tiny_backbone.tokenizer.decode(rows[1].ids)  # the caller's own system text stays


def test_a_prompt_read_before_its_text_is_another_prompt(fitted, tiny_backbone):
    before = copy.copy(fitted)
    before.before_text = True
    assert before.digest() != fitted.digest()  # answers cached under one are not the other's
    (plain,), _ = fitted.inputs(tiny_backbone, ["Hi"])
    (row,), soft = before.inputs(tiny_backbone, ["Hi"])
    decode = tiny_backbone.tokenizer.decode
    assert fitted.text not in decode(plain.ids) and fitted.text in decode(row.ids)
    assert torch.equal(soft.embeddings, fitted.inputs(tiny_backbone, ["Hi"])[1].embeddings)
    with pytest.raises(ConfigError, match="before_text"):
        SafetyPrompt(before_text="yes")._check_params()


def test_the_refusal_opening_is_read_after_the_prompt_without_changing_its_state(tiny_backbone):
    prompts = ["What is 2 + 2?", "Write a long poem about the sea and the wind, please."]
    rows = tiny_backbone.encode(prompts)
    suffix = tiny_backbone.tokenizer("I'm sorry", add_special_tokens=False)["input_ids"]
    h, logits, none = final_states(tiny_backbone, rows, logits=True)
    h2, logits2, opening = final_states(tiny_backbone, rows, logits=True, suffix=suffix)
    assert none is None and torch.allclose(h, h2, atol=1e-5) and torch.allclose(logits, logits2, atol=1e-4)
    for j, row in enumerate(rows):  # the mean log-probability of each suffix token, one prefix at a time
        total = 0.0
        for i, token in enumerate(suffix):
            ids = torch.tensor([[*row.ids, *suffix[:i]]])
            total += tiny_backbone.model(ids).logits[0, -1].float().log_softmax(-1)[token].item()
        assert opening[j].item() == pytest.approx(total / len(suffix), abs=1e-4)


def test_soft_tokens_that_do_not_fit_are_config_errors(tiny_backbone):
    rows, starts = soft_layout(tiny_backbone, ["Hi"], 3)
    ids = tiny_backbone.collate(rows)["input_ids"]
    values = torch.zeros(3, tiny_backbone.hidden_size)
    with pytest.raises(ConfigError, match="do not fit"):
        embed_inputs(tiny_backbone, rows, ids, SoftTokens(values, (len(rows[0]) - 1,)))
    with pytest.raises(ConfigError, match="starts for"):
        embed_inputs(tiny_backbone, rows, ids, SoftTokens(values, (0, 1)))


def test_the_anchor_finds_the_refusal_direction_of_separable_states():
    rng = np.random.default_rng(0)
    refused = np.arange(200) % 2 == 0
    harmful = np.arange(200) % 4 < 2
    states = rng.normal(size=(200, 32))
    states[:, 3] += 6.0 * refused  # the one direction that says "refused"
    anchor = estimate_anchor(states, refused, harmful, n_components=4)
    assert anchor.scores["refusal_balanced_accuracy"] > 0.95
    z, rest = anchor.coordinates(torch.as_tensor(states))
    logits = anchor.logit(z, "refusal").numpy()
    assert ((logits > 0) == refused).mean() > 0.95
    # The basis is orthonormal and the rest lies outside it.
    assert np.allclose(anchor.basis.T @ anchor.basis, np.eye(4), atol=1e-8)
    assert torch.allclose(rest @ torch.as_tensor(anchor.basis), torch.zeros(200, 4, dtype=rest.dtype), atol=1e-8)
    with pytest.raises(ConfigError, match="at least 2 refused"):
        estimate_anchor(states, np.zeros(200, bool) | (np.arange(200) == 0), harmful, n_components=4)


def test_fit_trains_the_embeddings_and_lowers_the_dro_loss(fitted, tiny_backbone):
    h = fitted.history_
    assert len(h) == 3 and h[-1]["refusal"] < h[0]["refusal"] and h[-1]["total"] < h[0]["total"]
    assert h[-1]["refusal_text"] < h[0]["refusal_text"]
    start = tiny_backbone.model.get_input_embeddings().weight[torch.tensor(
        (tiny_backbone.tokenizer(fitted.init_text, add_special_tokens=False)["input_ids"] * 6)[:6])]
    assert not np.allclose(fitted.embeddings_, start.detach().numpy())  # trained, not the written prompt's
    assert fitted.embeddings_.shape == (6, tiny_backbone.hidden_size)
    assert set(fitted.elicitation_) == {"none", "Refuse harmful requests."}
    assert fitted.training_summary_ == {"all/safe": 8, "all/unsafe": 8}
    assert fitted.backbone_identity_ == tiny_backbone.identity()


def test_save_load_round_trip_and_tampering(fitted, tiny_backbone, tmp_path):
    fitted.provenance_ = {"files": {"x.jsonl": "0" * 64}}
    folder = fitted.save(tmp_path / "sp")
    loaded = SafetyPrompt.load(folder, backbone=tiny_backbone)
    assert np.array_equal(loaded.embeddings_, fitted.embeddings_)
    assert loaded.digest() == fitted.digest() and loaded.provenance_ == fitted.provenance_
    assert loaded.generate(tiny_backbone, PROMPTS[:3], max_new_tokens=6) == fitted.generate(
        tiny_backbone, PROMPTS[:3], max_new_tokens=6)
    meta = json.loads((folder / META_FILE).read_text())
    meta["params"]["text"] = "Something else."
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PrototypeFileError, match="changed after it was saved"):
        SafetyPrompt.load(folder)
    fitted.save(folder)
    tensors = next(folder.glob("safety_prompt.*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(PrototypeFileError, match="does not match"):
        SafetyPrompt.load(folder)
    with pytest.raises(PrototypeFileError, match="no safety_prompt.json"):
        SafetyPrompt.load(tmp_path)


def test_a_prompt_trained_on_another_backbone_is_refused(fitted, backbone, tmp_path):
    folder = fitted.save(tmp_path / "sp")
    with pytest.raises(BackboneMismatchError, match="fit-safety-prompt"):
        SafetyPrompt.load(folder, backbone=backbone)
    with pytest.raises(BackboneMismatchError):
        as_safety_prompt(fitted, backbone)


def test_unfitted_and_invalid_parameters(tiny_backbone):
    with pytest.raises(NotFittedError):
        SafetyPrompt().inputs(tiny_backbone, ["hi"])
    with pytest.raises(ConfigError, match="n_tokens"):
        SafetyPrompt(n_tokens=0).fit(PROMPTS, LABELS, backbone=tiny_backbone)
    with pytest.raises(ConfigError, match="at least 2 harmful"):
        SafetyPrompt().fit(PROMPTS[:8], LABELS[:8], backbone=tiny_backbone)
    with pytest.raises(ConfigError, match="`safety_prompt` must be"):
        as_safety_prompt(3, tiny_backbone)
    assert as_safety_prompt(False, tiny_backbone) is None
    assert as_safety_prompt(None, tiny_backbone) is None  # nothing is shipped for a random model


def test_the_route_answers_under_the_trained_prompt_while_the_policy_keeps_its_text(fitted, tiny_backbone):
    protos = Prototypes(C=1.0).fit(SMALL_SAFE + SMALL_UNSAFE, [0] * 20 + [1] * 20, backbone=tiny_backbone)
    policy = Policy(**ALL_SAFETY_PROMPT, safety_prompt=fitted.text)
    trained = Guard(tiny_backbone, protos, policy, safety_prompt=fitted)
    written = Guard(tiny_backbone, protos, policy, safety_prompt=False)
    prompts = PROMPTS[:4]
    a = trained.batch(prompts, max_new_tokens=8)
    b = written.batch(prompts, max_new_tokens=8)
    assert all(r.route is Route.SAFETY_PROMPT for r in a + b)
    assert [r.text for r in a] == fitted.generate(tiny_backbone, prompts, max_new_tokens=8)
    assert [r.text for r in a] != [r.text for r in b]
    assert trained.invoke(prompts[0], max_new_tokens=8).text == a[0].text  # one request, streamed path too
    assert "".join(c.text for c in trained.stream(prompts[0], max_new_tokens=8)) == a[0].text
    # A policy with a text of its own gets that text: the trained prompt replaces only its own.
    own = Policy(**ALL_SAFETY_PROMPT, safety_prompt="Answer in French.")
    assert [r.text for r in trained.batch(prompts, policy=own, max_new_tokens=8)] == [
        r.text for r in written.batch(prompts, policy=own, max_new_tokens=8)]


def test_cached_answers_are_keyed_by_the_trained_prompt(fitted, tiny_backbone):
    from mlpm_guard.toolkit.endtoend import GuardSystem

    protos = Prototypes(C=1.0).fit(SMALL_SAFE + SMALL_UNSAFE, [0] * 20 + [1] * 20, backbone=tiny_backbone)
    keys = [GuardSystem(Guard(tiny_backbone, protos, safety_prompt=sp))._keys(["hi"], 8)
            for sp in (fitted, False)]
    assert keys[0] != keys[1]


def test_the_cli_trains_a_folder_the_guard_loads(tiny_backbone, odd_refusals, tmp_path, monkeypatch, capsys):
    from conftest import write_jsonl

    from mlpm_guard import cli

    data = write_jsonl(tmp_path / "advbench.jsonl", [{"prompt": p, "label": "unsafe" if y else "safe"}
                                              for p, y in zip(PROMPTS, LABELS)]
                       + [{"prompt": "held out", "label": "safe", "split": "test"}])
    monkeypatch.setattr(cli, "load_backbone", lambda spec, args: tiny_backbone)
    assert cli.main(["fit-safety-prompt", str(data), "--out", str(tmp_path / "sp"), "--epochs", "1",
                     "--n-tokens", "4", "--answer-weight", "0.5", "--before-text", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_tokens"] == 4 and summary["n_samples"] == 16  # the test split stays out
    loaded = SafetyPrompt.load(tmp_path / "sp", backbone=tiny_backbone)
    assert loaded.answer_weight == 0.5 and loaded.before_text is True
    (row,), _ = loaded.inputs(tiny_backbone, ["Hi"])
    assert loaded.text in tiny_backbone.tokenizer.decode(row.ids)  # the written prompt is read after the soft tokens
    assert loaded.provenance_["rows_per_source"] == {"advbench/safe": 8, "advbench/unsafe": 8}
    assert "advbench.jsonl" in loaded.provenance_["files"]
    assert loaded.provenance_["licences"] == {"advbench.jsonl": "MIT"}  # a shared set the project knows
    for bad in (["--answer-weight", "-1"], ["--n-tokens", "0"]):  # refused, not silently replaced by the default
        assert cli.main(["fit-safety-prompt", str(data), "--out", str(tmp_path / "bad"), "--epochs", "1", *bad,
                         "-q"]) != 0
        assert not (tmp_path / "bad").exists()


def test_seed_kinds_join_the_fit_as_a_source_with_their_licence(tiny_backbone, odd_refusals, tmp_path, monkeypatch,
                                                                capsys):
    from conftest import write_jsonl

    from mlpm_guard import cli

    data = write_jsonl(tmp_path / "advbench.jsonl", [{"prompt": p, "label": "unsafe" if y else "safe"}
                                              for p, y in zip(PROMPTS, LABELS)])
    monkeypatch.setattr(cli, "load_backbone", lambda spec, args: tiny_backbone)
    assert cli.main(["fit-safety-prompt", str(data), "--out", str(tmp_path / "sp"), "--epochs", "1",
                     "--n-tokens", "4", "--seed-kinds", "lookalike:3,contrast:2", "-q"]) == 0
    loaded = SafetyPrompt.load(tmp_path / "sp", backbone=tiny_backbone)
    assert loaded.provenance_["rows_per_source"]["seed/safe"] == 5
    assert loaded.provenance_["licences"] == {"advbench.jsonl": "MIT", "seed_prompts.jsonl": "Apache-2.0"}
    assert loaded.provenance_["seed_kinds"] == {"lookalike": 3, "contrast": 2}
    capsys.readouterr()
    assert cli.main(["fit-safety-prompt", str(data), "--out", str(tmp_path / "x"), "--seed-kinds", "lookalike:0", "-q"]) != 0
    assert "KIND:N" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_shipped_prompt_is_the_embedded_backbones_and_holds_only_permissive_data(backbone):
    shipped = as_safety_prompt(None, backbone)
    assert isinstance(shipped, SafetyPrompt)
    licences = shipped.provenance_["licences"]
    assert set(licences) == set(shipped.provenance_["files"]) and set(licences.values()) <= {"MIT", "Apache-2.0"}
    assert Guard(backbone, safety_prompt=None).safety_prompt is not None
    assert Guard(backbone, safety_prompt=False).safety_prompt is None


def test_strength_moves_the_soft_tokens_back_toward_where_the_fit_started(fitted, tiny_backbone, tmp_path):
    start = fitted._initial_embeddings(tiny_backbone, len(fitted.embeddings_)).numpy()
    half = SafetyPrompt(**{**fitted.get_params(), "strength": 0.5})
    for name, value in vars(fitted).items():
        if name.endswith("_"):
            setattr(half, name, value)
    assert np.allclose(fitted.applied_embeddings(tiny_backbone).numpy(), fitted.embeddings_)
    assert np.allclose(half.applied_embeddings(tiny_backbone).numpy(), (start + fitted.embeddings_) / 2, atol=1e-6)
    half.strength = 0.0
    assert np.allclose(half.applied_embeddings(tiny_backbone).numpy(), start)
    half.strength = 0.5
    assert half.digest() != fitted.digest() and "strength=0.5" in repr(half)
    _, soft = half.inputs(tiny_backbone, PROMPTS[:2])  # what the route prefills with
    assert torch.allclose(soft.embeddings.float(), half.applied_embeddings(tiny_backbone).float())
    assert not torch.allclose(soft.embeddings.float(), fitted.applied_embeddings(tiny_backbone).float())
    loaded = SafetyPrompt.load(half.save(tmp_path / "half"), backbone=tiny_backbone)
    assert loaded.strength == 0.5 and loaded.digest() == half.digest()
    # A file written before the parameter existed holds the fitted prompt at full strength.
    folder = fitted.save(tmp_path / "full")
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["params"].pop("strength") == 1.0
    from mlpm_guard.model.safety_prompt import FOLDER
    FOLDER.write(folder, {k: v for k, v in meta.items() if k not in ("tensors_sha256", "metadata_sha256")},
                 next(folder.glob("safety_prompt.*.safetensors")).read_bytes())
    assert SafetyPrompt.load(folder).strength == 1.0
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="strength"):
            SafetyPrompt(strength=bad).fit(PROMPTS, LABELS, backbone=tiny_backbone)


def test_choose_strength_takes_the_strongest_that_keeps_harmless_refusals_near_the_written_prompts(
        fitted, tiny_backbone, monkeypatch):
    from mlpm_guard.model import safety_prompt as sp

    start = fitted._initial_embeddings(tiny_backbone, len(fitted.embeddings_))
    full = torch.as_tensor(fitted.embeddings_) - start

    def fake_answers(backbone, rows, *, max_new_tokens, batch_size=16, soft=None):
        # Refusals grow with how far the soft tokens moved from the start: one in ten per 0.1 of
        # strength; the written prompt refuses two in ten.
        if soft is None:
            k = 2
        else:
            moved = float(((soft.embeddings.float() - start) * full).sum() / (full * full).sum())
            k = round(moved * 10)
        return ["I'm sorry, but I can't help with that." if i < k else "Sure." for i in range(len(rows))]

    monkeypatch.setattr(sp, "answers", fake_answers)
    monkeypatch.setattr(sp, "is_refusal", lambda text: text.startswith("I'm sorry"))
    harmless = [f"harmless request {i}" for i in range(10)]
    choice = sp.choose_strength(fitted, tiny_backbone, harmless, harmful=["a harmful one"], max_increase=0.1)
    assert choice.written == 0.2 and choice.strength == 0.3
    assert [t["strength"] for t in choice.tried] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    assert [round(t["harmless"], 1) for t in choice.tried] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    assert all("harmful" in t for t in choice.tried) and fitted.strength == 1.0  # the prompt is not changed
    assert sp.choose_strength(fitted, tiny_backbone, harmless, max_increase=0.0, strengths=[1.0, 0.5]).strength == 0.5
    with pytest.raises(ConfigError, match="harmless"):
        sp.choose_strength(fitted, tiny_backbone, [])
    with pytest.raises(ConfigError, match="strengths"):
        sp.choose_strength(fitted, tiny_backbone, harmless, strengths=[2.0])


def test_the_cli_chooses_the_strength_on_requests_left_out_of_the_fit(tiny_backbone, odd_refusals, tmp_path,
                                                                     monkeypatch, capsys):
    from conftest import write_jsonl

    from mlpm_guard import cli

    data = write_jsonl(tmp_path / "advbench.jsonl", [{"prompt": p, "label": "unsafe" if y else "safe"}
                                                     for p, y in zip(SMALL_SAFE + SMALL_UNSAFE, [0] * 20 + [1] * 20)])
    monkeypatch.setattr(cli, "load_backbone", lambda spec, args: tiny_backbone)
    assert cli.main(["fit-safety-prompt", str(data), "--out", str(tmp_path / "sp"), "--epochs", "1",
                     "--n-tokens", "4", "--max-per-source", "16", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = SafetyPrompt.load(tmp_path / "sp", backbone=tiny_backbone)
    record = loaded.provenance_["strength"]
    assert record["held_aside"] == {"harmless": 12, "harmful": 12}  # 20 of each, 8 of each drawn
    assert loaded.strength == record["strength"] == summary["strength"]
    assert record["tried"][-1]["strength"] == loaded.strength
    assert cli.main(["fit-safety-prompt", str(data), "--out", str(tmp_path / "fixed"), "--epochs", "1",
                     "--n-tokens", "4", "--strength", "0.25", "-q"]) == 0
    assert SafetyPrompt.load(tmp_path / "fixed").strength == 0.25
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["fit-safety-prompt", str(data), "--out", str(tmp_path / "x"), "--strength", "2"])
    assert "number in [0, 1]" in capsys.readouterr().err
