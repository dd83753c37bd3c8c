"""The label vocabularies a fit accepts, mapped to the two classes (0 safe, 1 unsafe)."""

from __future__ import annotations

from typing import Any

SAFE, UNSAFE = 0, 1
_LABELS = {
    "safe": SAFE, "unsafe": UNSAFE,
    "harmful": UNSAFE, "unharmful": SAFE, "harmless": SAFE, "benign": SAFE,
    "0": SAFE, "1": UNSAFE, "false": SAFE, "true": UNSAFE,
}
ACCEPTED_LABELS = "safe/unsafe, harmful/unharmful, harmless, benign, 0/1, true/false"


def parse_label(value: Any) -> int:
    """Map a label in any accepted vocabulary to 0 (safe) or 1 (unsafe).

    Raises:
        ValueError: for a value outside the accepted vocabularies.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    key = str(value).strip().lower()
    if key in _LABELS:
        return _LABELS[key]
    raise ValueError(f"unknown label {value!r}; accepted labels are {ACCEPTED_LABELS}")
