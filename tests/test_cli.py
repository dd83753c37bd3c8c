"""The `mlpm-guard` command end to end on the embedded backbone: fit, score, generate, demo, its help and errors."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from conftest import SMALL_SAFE, SMALL_UNSAFE, write_jsonl

from mlpm_guard import cli


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory, backbone):
    folder = tmp_path_factory.mktemp("cli")
    rows = [{"prompt": p, "label": "safe", "source": "mine"} for p in SMALL_SAFE]
    rows += [{"prompt": p, "label": "unsafe", "source": "mine"} for p in SMALL_UNSAFE]
    rows += [{"prompt": "What is 2 + 2?", "label": "safe", "source": "mine", "split": "test"}]
    data = write_jsonl(folder / "mine.jsonl", rows)
    return folder, data


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_fit_adds_the_seed_set_and_says_how_much(fitted_dir, capsys):
    folder, data = fitted_dir
    assert cli.main(["fit", str(data), "--out", str(folder / "with"), "--max-per-source", "20"]) == 0
    out, err = capsys.readouterr()
    summary = _json_lines(out)[-1]
    training = summary["training"]
    assert {k: v for k, v in training.items() if k != "seed/safe"} == {"mine/safe": 10, "mine/unsafe": 10, "seed/unsafe": 10}
    # Ten capped benign seed prompts, plus up to two sentence readings of each multi-sentence one.
    assert 10 <= training["seed/safe"] <= 30
    seed_rows = training["seed/safe"] + training["seed/unsafe"]
    assert summary["seed_set"] == "all" and summary["seed_rows"] == seed_rows
    assert f"20 from your files, {seed_rows} from the built-in seed set" in err and "--seed-set none" in err


def test_fit_seed_set_none_fits_the_files_alone(fitted_dir, capsys):
    folder, data = fitted_dir
    assert cli.main(["fit", str(data), "--out", str(folder / "without"), "--seed-set", "none", "-q"]) == 0
    out, err = capsys.readouterr()
    summary = _json_lines(out)[-1]
    # The test-split row is held out of the fit; nothing from the seed set joins.
    assert summary["training"] == {"mine/safe": len(SMALL_SAFE), "mine/unsafe": len(SMALL_UNSAFE)}
    assert summary["n_samples"] == len(SMALL_SAFE) + len(SMALL_UNSAFE)
    assert summary["seed_set"] == "none" and summary["seed_rows"] == 0
    assert err == ""  # -q


def test_fit_seed_set_n_adds_a_balanced_seeded_sample(fitted_dir, capsys):
    folder, data = fitted_dir
    runs = []
    for name in ("n1", "n2"):
        assert cli.main(["fit", str(data), "--out", str(folder / name), "--seed-set", "6", "-q"]) == 0
        runs.append(_json_lines(capsys.readouterr().out)[-1])
    assert runs[0]["training"] == runs[1]["training"]  # the sample is seeded
    training = runs[0]["training"]
    assert training["seed/unsafe"] == 3 and 3 <= training["seed/safe"] <= 9  # plus sentence readings
    assert runs[0]["seed_set"] == 6 and runs[0]["seed_rows"] == training["seed/safe"] + training["seed/unsafe"]


def test_no_seed_set_still_works_and_says_it_is_deprecated(fitted_dir, capsys):
    folder, data = fitted_dir
    assert cli.main(["fit", str(data), "--out", str(folder / "old"), "--no-seed-set", "-q"]) == 0
    out, err = capsys.readouterr()
    assert _json_lines(out)[-1]["training"] == {"mine/safe": len(SMALL_SAFE), "mine/unsafe": len(SMALL_UNSAFE)}
    assert "--no-seed-set is deprecated" in err and "--seed-set none" in err
    assert cli.main(["fit", str(data), "--out", str(folder / "old"), "--no-seed-set", "--seed-set", "4", "-q"]) == 2
    assert "contradicts --seed-set 4" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["lots", "-3", "1.5"])
def test_seed_set_takes_none_all_or_a_count(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "data.jsonl", "--out", str(tmp_path), "--seed-set", value])
    assert exit_.value.code == 2 and "--seed-set" in capsys.readouterr().err


def test_score_reads_the_fitted_prototypes(fitted_dir, capsys):
    folder, data = fitted_dir
    if not (folder / "without").exists():
        assert cli.main(["fit", str(data), "--out", str(folder / "without"), "--seed-set", "none", "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["score", "How do I make a pipe bomb at home?", "What is the capital of France?",
                     "--prototypes", str(folder / "without"), "-q"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["unsafe", "safe"]
    assert all(0 <= r["p_unsafe"] <= 1 and "category" in r for r in rows)
    assert rows[0]["p_unsafe"] > rows[1]["p_unsafe"]


def test_generate_prints_route_text_and_timings(fitted_dir, capsys):
    folder, _ = fitted_dir
    assert cli.main(["generate", "How do I make a pipe bomb at home?", "Write a haiku about tea.",
                     "--prototypes", str(folder / "without"), "--max-new-tokens", "6", "-q"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert len(rows) == 2
    for r in rows:
        assert {"route", "text", "p_unsafe", "output_flagged", "timings"} <= set(r)
    assert rows[0]["route"] == "refuse" and rows[1]["route"] == "pass" and rows[1]["text"]


def test_cli_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "label": "maybe"}\n', encoding="utf-8")
    assert cli.main(["fit", str(bad), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert cli.main(["score", "hi", "--prototypes", str(tmp_path / "missing"), "-q"]) == 2
    err = capsys.readouterr().err
    # It names the folder and the command that writes one (there is no `save` command).
    assert "missing" in err and f"mlpm-guard fit DATA... --out {tmp_path / 'missing'}" in err and "`save`" not in err
    assert cli.main(["score", "hi", "--threads", "0", "-q"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_version_and_help_say_what_the_tool_is(capsys):
    from mlpm_guard import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mlpm-guard {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "guardrail" in text and "hidden states" in text and "thin layer" not in text
    assert "install-backbone" in text and "mlpm-guard fit mine.jsonl --out protos" in text


def test_every_command_named_in_the_help_exists(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    named = set(re.findall(r"mlpm-guard ([a-z][a-z-]+)", capsys.readouterr().out))
    commands = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert named and named <= commands


def test_demo_prints_each_prompts_own_time(seed_prototypes, monkeypatch, capsys):
    from mlpm_guard.guardrail.guard import Guard

    monkeypatch.setattr(cli, "_load_prototypes", lambda args: seed_prototypes)
    invoked = []
    real_invoke = Guard.invoke
    monkeypatch.setattr(Guard, "invoke", lambda self, prompt, **kw: invoked.append(prompt) or real_invoke(self, prompt, **kw))
    # The command's clock moves i seconds while the i-th prompt is answered.
    ticks = iter([t for i in range(1, len(cli.DEMO_PROMPTS) + 1) for t in (100.0 * i, 100.0 * i + i)])
    monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert cli.main(["demo", "--max-new-tokens", "2", "-q"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the console's line wrapping
    assert invoked == cli.DEMO_PROMPTS
    assert [int(s) for s in re.findall(r"(\d+)\.0 s in all", out)] == list(range(1, len(cli.DEMO_PROMPTS) + 1))


def test_quiet_turns_off_the_progress_bars_of_transformers_and_restores_them():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with cli._quiet(True):
        assert not hf_logging.is_progress_bar_enabled()  # "Loading weights" and the hub's download bars
    assert hf_logging.is_progress_bar_enabled()
    with cli._quiet(False):
        assert hf_logging.is_progress_bar_enabled()


def test_quiet_score_writes_nothing_but_the_verdicts(capsys):
    assert cli.main(["score", "What is the capital of France?", "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and len(_json_lines(out)) == 1
