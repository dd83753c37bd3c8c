"""MLCommons / Llama Guard hazard codes S1-S14 and the mapping of dataset category names onto them."""

from __future__ import annotations

import re

HAZARDS: dict[str, str] = {
    "S1": "Violent crimes",
    "S2": "Non-violent crimes",
    "S3": "Sex-related crimes",
    "S4": "Child sexual exploitation",
    "S5": "Defamation",
    "S6": "Specialized advice",
    "S7": "Privacy",
    "S8": "Intellectual property",
    "S9": "Indiscriminate weapons",
    "S10": "Hate",
    "S11": "Suicide & self-harm",
    "S12": "Sexual content",
    "S13": "Elections",
    "S14": "Code interpreter abuse",
}

# Keyword patterns over lower-cased dataset category names, tried in order; the first match wins.
# They cover the category vocabularies of the common public sets (HarmBench, StrongREJECT,
# Do-Not-Answer, CoCoNot, ToxicChat, Aegis, BeaverTails) without naming any one of them.
_PATTERNS: list[tuple[str, str]] = [
    (r"child|minor|csam|csea", "S4"),
    (r"suicide|self[- ]?harm|eating disorder", "S11"),
    (r"chemical|biolog|nuclear|radiolog|explosive|weapon|cbrn", "S9"),
    (r"elect|voting|voter", "S13"),
    (r"code interpreter|sandbox", "S14"),
    (r"sex.*crime|traffick|non[- ]?consensual|sexual assault|rape", "S3"),
    (r"sexual|adult content|explicit|porn|nsfw", "S12"),
    (r"defam|libel|slander", "S5"),
    (r"privacy|personal|information hazard|doxx|surveil", "S7"),
    (r"copyright|intellectual|piracy|trademark", "S8"),
    (r"hate|discriminat|harass|bully|toxic|offensive|racis|slur", "S10"),
    (r"specialized advice|medical advice|legal advice|financial advice|unqualified advice", "S6"),
    (r"violen|terror|murder|kill|assault|physical harm", "S1"),
    (r"non[- ]?violent|crime|illegal|fraud|cyber|hack|malware|theft|scam|drug|deception|"
     r"malicious use|disinformation|misinformation|manipulat", "S2"),
]


def hazard_code(category: str | None) -> str | None:
    """Return the S-code for a dataset category name, or ``None`` when it does not map.

    >>> hazard_code("Violence"), hazard_code("S10"), hazard_code("wildchats")
    ('S1', 'S10', None)
    """
    if category is None:
        return None
    text = str(category).strip()
    code = text.upper()
    if code in HAZARDS:
        return code
    low = text.lower()
    for pattern, code in _PATTERNS:
        if re.search(pattern, low):
            return code
    return None


def category_label(category: str | None) -> str | None:
    """The label a verdict reports: the S-code when the category maps, else the name itself."""
    if category is None or not str(category).strip():
        return None
    return hazard_code(category) or str(category).strip()


def category_name(label: str | None) -> str | None:
    if label is None:
        return None
    return HAZARDS.get(label, label)
