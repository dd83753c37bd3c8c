"""Labelled prompt files: reading JSONL/CSV, label vocabularies, and sampling per source."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..estimator.labels import parse_label
from ..vocabulary.errors import DataError


@dataclass(frozen=True)
class Turn:
    """One message of a labelled conversation (hashable, and read by the guard like a message dict)."""

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One labelled prompt: a string, or a conversation (a tuple of turns)."""

    prompt: str | tuple[Turn, ...]
    label: int  # 0 safe, 1 unsafe
    category: str | None = None
    source: str = ""
    split: str | None = None

    @property
    def text(self) -> str:
        """The prompt's text (a conversation's turns joined by newlines)."""
        return self.prompt if isinstance(self.prompt, str) else "\n".join(t.content for t in self.prompt)


def _rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        yield from _decoded_rows(path)
    except UnicodeDecodeError as exc:
        msg = (f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start}); "
               f"save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`")
        raise DataError(msg) from None


def _decoded_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    # utf-8-sig: spreadsheet programs start UTF-8 files with a byte-order mark, which would
    # otherwise become part of the first column's name ("\ufeffprompt").
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
                yield lineno, row
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for lineno, row in enumerate(reader, 2):
                yield lineno, row
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .csv")


def load_examples(path: str | Path) -> list[Example]:
    """Read a labelled prompt file (JSONL or CSV with ``prompt`` and ``label``).

    Optional columns: ``category``, ``source`` (defaults to the file name without extension)
    and ``split``. A JSONL row may hold a conversation instead of a prompt: ``messages``, a list
    of ``{"role", "content"}`` objects.

    Raises:
        DataError: naming the file and line of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    for lineno, row in _rows(path):
        if row.get("prompt") is None and isinstance(row.get("messages"), list):
            row = {**row, "prompt": _turns(row["messages"], f"{path}:{lineno}")}
        missing = [k for k in ("prompt", "label") if k not in row or row[k] is None]
        if missing:
            raise DataError(f"{path}:{lineno}: missing column(s) {missing}; each row needs `prompt` (or `messages`) "
                            "and `label`")
        prompt = row["prompt"]
        if not isinstance(prompt, tuple) and (not isinstance(prompt, str) or not prompt.strip()):
            raise DataError(f"{path}:{lineno}: `prompt` must be a non-empty string")
        try:
            label = parse_label(row["label"])
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
        category = row.get("category")
        category = str(category).strip() if category not in (None, "") else None
        source = str(row.get("source") or path.stem)
        split = row.get("split")
        out.append(Example(prompt, label, category, source, str(split) if split not in (None, "") else None))
    if not out:
        raise DataError(f"{path}: the file has no rows")
    return out


def _turns(messages: list[Any], where: str) -> tuple[Turn, ...]:
    turns = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: `messages[{i}]` must be an object with string `role` and `content`")
        turns.append(Turn(m["role"], m["content"]))
    if not turns:
        raise DataError(f"{where}: `messages` is empty")
    return tuple(turns)


def cap_per_source(examples: Sequence[Example], max_per_source: int | None, seed: int = 0) -> list[Example]:
    """Keep at most ``max_per_source`` examples of each source, balancing its two labels.

    Within a source that has both labels, each label gets half of the budget first and the
    other label's unused share goes to the rest. The draw is seeded per source, so a fit is
    repeatable and the rows drawn from one source do not depend on which other sources are present.
    """
    if max_per_source is None:
        return list(examples)
    if max_per_source < 1:
        raise DataError(f"`max_per_source` must be at least 1, got {max_per_source}")
    by_source: dict[str, list[list[Example]]] = defaultdict(lambda: [[], []])
    for ex in examples:
        by_source[ex.source][ex.label].append(ex)
    out: list[Example] = []
    for source in sorted(by_source):
        rng = random.Random(f"{seed}:{source}")  # str seeds hash with sha512: stable across runs
        pools = [rng.sample(pool, len(pool)) for pool in by_source[source]]
        share = [min(len(p), max_per_source // 2) for p in pools]
        left = max_per_source - sum(share)
        for lab in sorted((0, 1), key=lambda k: len(pools[k]) - share[k]):
            extra = min(left, len(pools[lab]) - share[lab])
            share[lab] += extra
            left -= extra
        for lab in (0, 1):
            out.extend(pools[lab][: share[lab]])
    return out


def seed_examples(kinds: Iterable[str] | None = None) -> list[Example]:
    """The built-in seed set shipped with the package (see ``resources/seed_prompts.jsonl``), or
    only its rows of the given ``kinds`` (``"lookalike"``, ``"contrast"``, ``"malware"``, ...)."""
    rows = _resource_examples("seed_prompts.jsonl", "seed")
    if kinds is None:
        return rows
    wanted = set(kinds)
    ref = resources.files("mlpm_guard") / "resources" / "seed_prompts.jsonl"
    row_kinds = [json.loads(line).get("kind") for line in ref.read_text(encoding="utf-8").splitlines() if line.strip()]
    unknown = wanted - set(row_kinds)
    if unknown:
        raise DataError(f"the seed set has no rows of kind(s) {sorted(unknown)}; it has {sorted(set(row_kinds))}")
    return [e for e, kind in zip(rows, row_kinds) if kind in wanted]


def seed_answers() -> list[Example]:
    """The built-in answers (``resources/seed_answers.jsonl``): requests with an answer that
    complies with harm or helps harmlessly, as conversations ending with the assistant's turn, whole
    and cut after their opening; what the answer head is fitted on."""
    return _resource_examples("seed_answers.jsonl", "seed answers")


def seed_content() -> tuple[list[Example], list[str | None]]:
    """The built-in texts the content head is fitted on, and where each unsafe one's harm lies.

    ``resources/seed_content.jsonl`` holds documents and tool results of many kinds, ordinary ones
    and ones carrying an instruction aimed at the assistant (with ``span``, the instruction); the
    seed set's ``content`` rows (short harmful and ordinary passages) and the built-in answers
    (``seed_answers.jsonl``, whole answers: text a model wrote, harmful or helpful) join them, each
    harmful as a whole.
    """
    examples, spans = [], []
    for name, kinds in (("seed_content.jsonl", None), ("seed_prompts.jsonl", {"content"}),
                        ("seed_answers.jsonl", {"answer"})):
        ref = resources.files("mlpm_guard") / "resources" / name
        for line in ref.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else None
            if row is None or (kinds is not None and row.get("kind") not in kinds):
                continue
            text = row["messages"][-1]["content"] if "messages" in row else row["prompt"]
            examples.append(Example(text, parse_label(row["label"]), row.get("category"), "seed content"))
            spans.append(row.get("span"))
    return examples, spans


def _resource_examples(name: str, source: str) -> list[Example]:
    ref = resources.files("mlpm_guard") / "resources" / name
    with resources.as_file(ref) as path:
        return [Example(e.prompt, e.label, e.category, source, e.split) for e in load_examples(path)]


def seed_file(name: str = "seed_prompts.jsonl") -> Path:
    """Where a built-in seed file lies on disk."""
    return Path(str(resources.files("mlpm_guard") / "resources" / name))


def seed_digest(name: str = "seed_prompts.jsonl") -> str:
    """A short digest of a built-in seed file (names the seed-set fit in the cache, and the seed
    set in a release fit's provenance)."""
    ref = resources.files("mlpm_guard") / "resources" / name
    return hashlib.sha256(ref.read_bytes()).hexdigest()[:12]
