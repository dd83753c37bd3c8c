"""Which texts are in another language than English, for the prototypes' other-language refusal line.

A small backbone reads other languages less surely than English: harmful requests in French,
Russian or Chinese land between the safety-prompt and refusal lines far more often than English
ones. Prototypes with ``other_language_threshold`` set refuse such texts from that line instead
(:func:`.scoring.refusal_line`); the shipped default leaves it off, because on this backbone its
ordinary requests in other languages score high too (docs/quality.md).

The identifier is py3langid (langid.py's model, 97 languages, numpy only), loaded on first use.
"""

from __future__ import annotations

from functools import cache
from typing import Any

#: Texts shorter than this many UTF-8 bytes keep the English line: "Continue." or "ok go on" look
#: like no language in particular (about seven CJK characters are enough).
MIN_BYTES = 20
#: A text is another language when the identifier gives English less than this probability.
#: All 450 multilingual probe prompts score below it; of the 350 English instruction, question and
#: passage probes only "Are bananas radioactive?" does (tests/test_language.py).
MAX_ENGLISH_PROBABILITY = 0.05


@cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def english_probability(text: str) -> float:
    """The identifier's probability that ``text`` is English."""
    return float(dict(_identifier().rank(text)).get("en", 0.0))


def is_other_language(text: str) -> bool:
    """Whether ``text`` is long enough to tell and, by the identifier, not English."""
    text = text.strip()
    return len(text.encode("utf-8")) >= MIN_BYTES and english_probability(text) < MAX_ENGLISH_PROBABILITY
