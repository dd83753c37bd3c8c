"""Reading labelled files: accepted vocabularies, clear errors, per-source caps."""

import pytest
from conftest import write_jsonl

from mlpm_guard.vocabulary.errors import DataError
from mlpm_guard.toolkit.data import (
    Example,
    cap_per_source,
    load_examples,
    parse_label,
    seed_examples,
)


@pytest.mark.parametrize("value,expected", [
    ("safe", 0), ("unsafe", 1), ("harmful", 1), ("unharmful", 0), ("Harmful ", 1), (0, 0), (1, 1),
    ("0", 0), ("1", 1), (True, 1), (False, 0), ("true", 1), ("false", 0), ("benign", 0),
])
def test_parse_label_vocabularies(value, expected):
    assert parse_label(value) == expected


@pytest.mark.parametrize("value", ["maybe", 2, "", None, 0.5])
def test_parse_label_rejects_unknown(value):
    with pytest.raises(ValueError, match="accepted labels"):
        parse_label(value)


def test_jsonl_and_csv(tmp_path):
    j = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "label": "safe"},
                                           {"prompt": "bad", "label": 1, "category": "S1", "split": "test"}])
    rows = load_examples(j)
    assert rows == [Example("hi", 0, None, "a", None), Example("bad", 1, "S1", "a", "test")]
    c = tmp_path / "b.csv"
    c.write_text('prompt,label,source\n"x, y",harmful,web\nz,unharmful,web\n', encoding="utf-8")
    assert [(e.prompt, e.label, e.source) for e in load_examples(c)] == [("x, y", 1, "web"), ("z", 0, "web")]


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a"}\n', r"bad.jsonl:1: missing column\(s\) \['label'\]"),
    ('{"prompt": "a", "label": "safe"}\n{"prompt": "b", "label": "meh"}\n', r"bad.jsonl:2: unknown label 'meh'"),
    ("", r"bad.jsonl: the file has no rows"),
    ('{"prompt": "a", "label": "safe"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
    ('{"prompt": "", "label": "safe"}\n', r"bad.jsonl:1: `prompt` must be a non-empty string"),
    ('["a", "safe"]\n', r"bad.jsonl:1: expected a JSON object"),
])
def test_bad_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_bad_csv_and_suffix(tmp_path):
    c = tmp_path / "bad.csv"
    c.write_text("text,label\nhello,safe\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:2: missing column"):
        load_examples(c)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")


def test_cap_per_source_balances_labels():
    rows = [Example(f"s{i}", 0, source="a") for i in range(50)] + [Example(f"u{i}", 1, source="a") for i in range(5)]
    rows += [Example(f"b{i}", 1, source="b") for i in range(30)]
    capped = cap_per_source(rows, 20, seed=1)
    a = [e for e in capped if e.source == "a"]
    assert sum(e.label for e in a) == 5 and len(a) == 20  # all 5 unsafe, the rest safe
    assert len([e for e in capped if e.source == "b"]) == 20
    assert capped == cap_per_source(rows, 20, seed=1)  # repeatable
    assert cap_per_source(rows, None) == rows


def test_cap_per_source_draw_does_not_depend_on_other_sources():
    """Adding or leaving out a file must not change the rows drawn from the others (leave-one-source-out)."""
    a = [Example(f"a{i}", i % 2, source="a") for i in range(100)]
    b = [Example(f"b{i}", i % 2, source="b") for i in range(100)]
    alone = cap_per_source(a, 10, seed=3)
    together = [e for e in cap_per_source(b + a, 10, seed=3) if e.source == "a"]
    assert alone == together
    assert alone != cap_per_source(a, 10, seed=4)  # the seed still matters


def test_seed_rows_are_chosen_by_kind():
    rows = seed_examples(["malware", "lookalike"])
    assert rows and len(rows) < len(seed_examples())
    assert {e.label for e in seed_examples(["malware"])} == {1} and {e.label for e in seed_examples(["lookalike"])} == {0}
    with pytest.raises(DataError, match="no rows of kind"):
        seed_examples(["no such kind"])


def test_seed_set_is_shipped_and_balanced():
    rows = seed_examples()
    unsafe = [e for e in rows if e.label == 1]
    safe = [e for e in rows if e.label == 0]
    assert len(unsafe) >= 300 and len(safe) >= 300
    assert {e.category for e in unsafe} >= {f"S{i}" for i in range(1, 15)}
    assert any("kill" in e.prompt.lower() and "process" in e.prompt.lower() for e in safe)
