"""Labelled prompt files: reading JSONL/CSV, label vocabularies, and sampling per source."""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..labels import parse_label


@dataclass(frozen=True)
class Example:
    """One labelled prompt."""

    prompt: str
    label: int  # 0 safe, 1 unsafe
    category: str | None = None
    source: str = ""
    split: str | None = None


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
    and ``split``.

    Raises:
        DataError: naming the file and line of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    for lineno, row in _rows(path):
        missing = [k for k in ("prompt", "label") if k not in row or row[k] is None]
        if missing:
            raise DataError(f"{path}:{lineno}: missing column(s) {missing}; each row needs `prompt` and `label`")
        prompt = row["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
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


def seed_examples() -> list[Example]:
    """The built-in seed set shipped with the package (see ``resources/seed_prompts.jsonl``)."""
    ref = resources.files("mlpm_guard") / "resources" / "seed_prompts.jsonl"
    with resources.as_file(ref) as path:
        return [Example(e.prompt, e.label, e.category, "seed", e.split) for e in load_examples(path)]
