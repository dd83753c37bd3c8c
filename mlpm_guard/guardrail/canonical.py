"""The canonical forms of a text: what the answering model can read in it that its surface hides.

A capable model reads ``H o w  d o  I ...``, ``H0w d0 1 bu1ld 4 b0mb``, a word with a zero-width
space between its letters, Cyrillic look-alike letters, a base64 payload or ROT13 as the request
they spell. The backbone's states of the raw text do not: there the request is noise. So the guard
also reads the text in its canonical forms (:mod:`.views` reads every form; the strictest reading
wins), and each form names what it undid:

- **normalised**: Unicode NFKC (full-width and mathematical letters, ligatures), invisible format
  characters removed (category Cf, variation selectors), chat-template markers typed into the
  text (``<|im_start|>user``, ``[INST]``) removed, confusable letters mapped to the Latin
  letter they imitate (the Unicode TR39 confusables table, from ``confusable_homoglyphs``), letters
  spread out by spaces or punctuation joined again, emoji strewn between words removed, and
  leetspeak undone;
- **decoded**: payloads the text carries, decoded in place: base64, base32, hex, URL and
  quoted-printable escapes, HTML and ``\\u`` escapes, Unicode tag characters, Morse, Braille,
  ROT13, Atbash, reversed text, and strings split into variables and joined again.

Each step applies only where its pattern is plainly there (several spread-out letters, several
leet words, a payload that decodes to readable text), so ordinary text has no other form and costs
nothing more; a key, a hash or a binary blob decodes to no readable text and is left alone.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import html
import json
import quopri
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources

#: How many times decoding is applied to its own output (base64 inside ROT13 ...).
DECODE_ROUNDS = 2


@dataclass(frozen=True)
class Form:
    """A canonical form of a text and the steps that made it (e.g. ``("spread", "leet")``)."""

    text: str
    steps: tuple[str, ...]


def label(steps: Iterable[str]) -> str:
    """How a reading of a canonical form is named: ``"normalised (spread, leet)"`` or, when a
    payload was decoded, ``"decoded (base64, cipher)"``."""
    ordered = sorted(set(steps), key=STEPS.index)
    kind = "decoded" if any(s.startswith("decoded ") for s in ordered) else "normalised"
    return f"{kind} ({', '.join(s.removeprefix('decoded ') for s in ordered)})"


def canonical(text: str) -> Form | None:
    """The text's canonical form, or ``None`` when it has none (ordinary text).

    Invisible characters are removed and Unicode normalised first, payloads are decoded next (so
    undoing leetspeak cannot break a base64 string), and the decoded text is normalised again.

    >>> canonical("H o w  d o  I  b a k e  b r e a d ?").text
    'How do I bake bread?'
    >>> canonical("An ordinary sentence.") is None
    True
    """
    steps: list[str] = []
    text = _apply(text, _PLAIN, steps)
    text, kinds = decode(text)
    steps += [f"decoded {k}" for k in kinds]
    text = _apply(text, _NORMALISERS, steps)
    return Form(text, tuple(steps)) if steps else None


def _apply(text: str, stages: list[tuple[str, Callable[[str], str]]], steps: list[str]) -> str:
    for name, stage in stages:
        changed = stage(text)
        if changed != text:
            text = changed
            steps.append(name)
    return text


# ---------------------------------------------------------------------- normalising
def _nfkc(text: str) -> str:
    """Compatibility forms (full-width and mathematical letters, ligatures) as plain letters; a
    change of punctuation or spacing alone (CJK text's full-width "？") is not a disguise."""
    out = unicodedata.normalize("NFKC", text)
    return out if [c for c in out if c.isalnum()] != [c for c in text if c.isalnum()] else text


# Tag characters (U+E0000-E007F) are decoded, not dropped: they can spell hidden ASCII text.
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
                        "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U0001d173-\U0001d17a\U000e0100-\U000e01ef]")


def has_visible_text(text: str) -> bool:
    """Whether ``text`` shows anything on a screen (not only spaces, format characters and fillers
    such as U+200B or U+3164)."""
    return any(not ch.isspace() and unicodedata.category(ch)[0] not in "CZ" and ch != "\u2800"
               for ch in _INVISIBLE.sub("", text))


def _visible(text: str) -> str:
    """Format characters and fillers removed (zero-width spaces and joiners, bidi controls, ...)."""
    text = _INVISIBLE.sub("", text)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf" or 0xE0000 <= ord(ch) <= 0xE007F)


@functools.lru_cache(maxsize=1)
def _confusable_map() -> dict[str, str]:
    """Non-ASCII characters that the TR39 confusables table maps to one ASCII letter."""
    ref = resources.files("confusable_homoglyphs") / "confusables.json"
    table = json.loads(ref.read_text(encoding="utf-8"))
    out = {}
    for char, entries in table.items():
        if len(char) != 1 or char.isascii():
            continue
        letters = {e["c"] for e in entries if len(e["c"]) == 1 and e["c"].isascii() and e["c"].isalpha()}
        if len(letters) == 1:
            out[char] = letters.pop()
    return out


def _skeleton(text: str) -> str:
    """Look-alike letters from other scripts mapped to the Latin letters they imitate, in text that
    is mostly Latin or in words that mix scripts (so Russian or Greek text is left as it is)."""
    table = _confusable_map()
    letters = [ch for ch in text if ch.isalpha()]
    if not letters or not any(ch in table for ch in letters):
        return text
    latin = sum(ch.isascii() for ch in letters) / len(letters)
    if latin >= 0.5:
        return "".join(table.get(ch, ch) for ch in text)
    return re.sub(r"\w+", lambda m: _mixed_word(m.group(0), table), text)


def _mixed_word(word: str, table: dict[str, str]) -> str:
    if any(ch.isascii() and ch.isalpha() for ch in word) and any(ch in table for ch in word):
        return "".join(table.get(ch, ch) for ch in word)
    return word


# Letters spread out: single characters with one to three separators between them.
_SEPARATORS = " .\\-_*·|/+~"
_SPREAD = re.compile(rf"(?<!\w)\w(?:[{_SEPARATORS}]{{1,3}}\w(?!\w)){{3,}}")
_GAP = re.compile(rf"[{_SEPARATORS}]{{1,3}}")


def _joined(text: str) -> str:
    """Letters spread out by spaces or punctuation joined into words (``H o w  d o`` -> ``How do``).

    Between words the gap is longer (``"  "``) or of another kind (``"H.o.w d.o"``) than between
    letters; where every gap is the same, the letters are joined into one run.
    """
    def join(m: re.Match[str]) -> str:
        run = m.group(0)
        if sum(ch.isalpha() for ch in run) < 3 * sum(ch.isdigit() for ch in run) + 3:
            return run  # digits spread out are a phone number or a version, not a word
        gaps = _GAP.findall(run)
        inner = max(set(gaps), key=gaps.count)
        return _GAP.sub(lambda g: "" if g.group(0) == inner else " ", run)

    joined = _SPREAD.sub(join, text)
    # The spread-out sentence's own punctuation was spread too: "bomb ?" -> "bomb?".
    return re.sub(r"(?<=\w) +([?.!,;:])(?=\s|$)", r"\1", joined) if joined != text else text


_EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\ufe0f\u200d]")


def _without_emoji(text: str) -> str:
    """Emoji strewn between words removed (three or more, so a smiley at the end stays)."""
    if len(_EMOJI.findall(text)) < 3:
        return text
    return re.sub(r"[ \t]{2,}", " ", _EMOJI.sub("", text)).strip()


_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
                       "@": "a", "$": "s", "!": "i", "|": "l", "+": "t", "€": "e"})
_LEET_CHARS = "013457 89@$!|+€".replace(" ", "")
_TOKEN = re.compile(r"\S+")


def _leet_letters(core: str) -> bool:
    """Letters mixed with the signs leetspeak uses for letters, in a word that is no key or hash
    (long, or with a run of digits)."""
    return any(ch.isalpha() for ch in core) and any(ch in _LEET_CHARS for ch in core) and len(core) <= 16 \
        and not re.search(r"\d{3}", core)


def _leet_word(word: str) -> bool:
    core = word.strip(".,;:?!\"'()[]")
    # Before leetspeak is plainly there, "4K" or "10km" is a number with a unit.
    return _leet_letters(core) and not re.fullmatch(r"[\d.,:/\-]+[a-zA-Z]{0,3}", core)


def _unleet(text: str) -> str:
    """Leetspeak undone when it is plainly there: at least two words, and a fifth of all words,
    mixing letters with the digits and signs that stand for letters (``H0w``, ``p1p3``)."""
    words = _TOKEN.findall(text)
    leet = [w for w in words if _leet_word(w)]
    if len(leet) < 2 or len(leet) < 0.2 * len(words):
        return text

    def undo(m: re.Match[str]) -> str:
        word = m.group(0)
        core = word.rstrip(".,;:?!\"')]")
        tail = word[len(core):]
        if _leet_letters(core) or (len(core) == 1 and core in "0134578@$"):
            return core.translate(_LEET) + tail
        return word

    return _TOKEN.sub(undo, text)


# Chat-template markers typed into a message (<|im_start|>, [INST], <<SYS>>, <|eot_id|>, ...): the guard
# keeps them plain text, but a forged turn is easier to read as what it says without them.
_TEMPLATE_MARKS = re.compile(r"<\|[A-Za-z_]{2,20}\|>(?:(?:system|user|assistant|tool)\b)?|\[/?INST\]|<</?SYS>>|</?s>")


def _untemplated(text: str) -> str:
    """Chat-template markers typed into the text replaced by line breaks."""
    return _TEMPLATE_MARKS.sub("\n", text) if "<" in text or "[" in text else text


_PLAIN: list[tuple[str, Callable[[str], str]]] = [("unicode", _nfkc), ("invisible", _visible),
                                                  ("template", _untemplated)]
_NORMALISERS: list[tuple[str, Callable[[str], str]]] = [
    ("confusables", _skeleton), ("spread", _joined), ("emoji", _without_emoji), ("leet", _unleet),
]


# ---------------------------------------------------------------------- decoding
def decode(text: str) -> tuple[str, list[str]]:
    """``text`` with the payloads it carries decoded in place, and which encodings they were in."""
    kinds: list[str] = []
    for _ in range(DECODE_ROUNDS):
        changed = False
        for kind, step in _DECODERS:
            new = step(text)
            if new != text:
                text, changed = new, True
                if kind not in kinds:
                    kinds.append(kind)
        if not changed:
            break
    return text, kinds


def _printable(data: bytes | str) -> str | None:
    """Decoded bytes as text when they are valid UTF-8 with no control characters."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if any(unicodedata.category(ch)[0] == "C" and ch not in "\n\t\r" for ch in data):
        return None
    return data


def _readable(data: bytes | str) -> str | None:
    """Decoded bytes as text when they read as text: printable, mostly letters and spaces, with
    several different letters (a key, a hash, a binary blob or a row of dashes is none of these)."""
    text = _printable(data)
    if text is None:
        return None
    text = text.strip()
    letters = [ch for ch in text if ch.isalpha()]
    if len(set(letters)) < 5 or len(letters) + text.count(" ") < 0.75 * len(text):
        return None
    return text


def _replace(pattern: re.Pattern[str], text: str, decoder: Callable[[str], bytes | str],
             check: Callable[[bytes | str], str | None] = _readable) -> str:
    """Each match of ``pattern`` replaced by its decoding where ``check`` accepts it."""
    def sub(m: re.Match[str]) -> str:
        try:
            out = check(decoder(m.group(0)))
        except (ValueError, binascii.Error, UnicodeError):
            return m.group(0)
        return out if out is not None else m.group(0)

    return pattern.sub(sub, text)


# Runs of the base64 alphabets (standard and URL-safe) with a digit, a sign or padding in them, so
# that a long plain word is not taken for one.
_BASE64 = re.compile(r"(?<![\w+/=-])(?=[A-Za-z0-9+/_-]*[0-9+/_-]|[A-Za-z0-9+/_-]{12,}=)[A-Za-z0-9+/_-]{12,}={0,2}"
                     r"(?![\w+/=-])")


def _b64(token: str) -> bytes:
    token = token.rstrip("=")
    padded = token + "=" * (-len(token) % 4)
    return base64.b64decode(padded, altchars=b"-_" if ("-" in token or "_" in token) else None, validate=True)


_BASE32 = re.compile(r"(?<![A-Za-z0-9=])(?:[A-Z2-7]{8}){2,}(?:[A-Z2-7]{2,7}=*)?(?![A-Za-z0-9=])")
_HEX = re.compile(r"(?<![0-9A-Za-z])(?:0x)?(?:[0-9A-Fa-f]{2}[ :]?){6,}[0-9A-Fa-f]{2}(?![0-9A-Za-z])")
_PERCENT = re.compile(r"(?:[^\s%]*%[0-9A-Fa-f]{2}){3,}[^\s%]*")
_QUOTED = re.compile(r"(?:[^\s=]*=[0-9A-F]{2}){3,}[^\s=]*")
_ESCAPES = re.compile(r"(?:\\u[0-9A-Fa-f]{4}|\\x[0-9A-Fa-f]{2}){3,}")
_ENTITIES = re.compile(r"(?:&#x?[0-9A-Fa-f]+;|&[a-z]+;){3,}")
_TAGS = re.compile("[\U000e0000-\U000e007f]+")
_MORSE = re.compile(r"(?<![\w])(?:[.\-]{1,7}(?:[ ]{1,3}|[ ]?/[ ]?)){3,}[.\-]{1,7}(?![\w])")
_BRAILLE = re.compile("[\u2800-\u28ff][\u2800-\u28ff ]{3,}")

_MORSE_CODE = {  # ITU-R M.1677-1
    ".-": "a", "-...": "b", "-.-.": "c", "-..": "d", ".": "e", "..-.": "f", "--.": "g", "....": "h", "..": "i",
    ".---": "j", "-.-": "k", ".-..": "l", "--": "m", "-.": "n", "---": "o", ".--.": "p", "--.-": "q", ".-.": "r",
    "...": "s", "-": "t", "..-": "u", "...-": "v", ".--": "w", "-..-": "x", "-.--": "y", "--..": "z",
    "-----": "0", ".----": "1", "..---": "2", "...--": "3", "....-": "4", ".....": "5", "-....": "6",
    "--...": "7", "---..": "8", "----.": "9", ".-.-.-": ".", "--..--": ",", "..--..": "?",
}
# Braille letters a-z (dots 1-6, Unicode's offsets from U+2800).
_BRAILLE_LETTERS = dict(zip([0x01, 0x03, 0x09, 0x19, 0x11, 0x0B, 0x1B, 0x13, 0x0A, 0x1A, 0x05, 0x07, 0x0D,
                             0x1D, 0x15, 0x0F, 0x1F, 0x17, 0x0E, 0x1E, 0x25, 0x27, 0x3A, 0x2D, 0x3D, 0x35],
                            "abcdefghijklmnopqrstuvwxyz"))


def _morse(token: str) -> str:
    words = re.split(r"\s*/\s*|\s{3,}", token.strip())
    return " ".join("".join(_MORSE_CODE.get(c, "") for c in w.split()) for w in words)


def _braille(token: str) -> str:
    return "".join(" " if ch == " " or ch == "\u2800" else _BRAILLE_LETTERS.get(ord(ch) - 0x2800, "") for ch in token)


def _tags(token: str) -> str:
    return "".join(chr(ord(ch) - 0xE0000) for ch in token if 0xE0020 <= ord(ch) <= 0xE007E)


def _hex(token: str) -> bytes:
    return bytes.fromhex(re.sub(r"0x|[ :]", "", token))


@functools.lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def _wordiness(text: str) -> float:
    """The share of a text's words that are common English words (ciphered text has almost none)."""
    words = re.findall(r"[a-zA-Z]+", text.lower())
    return sum(w in _common_words() for w in words) / len(words) if len(words) >= 3 else 0.0


# Letter frequencies of English text (per cent), for telling a substitution cipher from English.
_ENGLISH_LETTERS = dict(zip("etaoinshrdlcumwfgypbvkjxqz", (12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8,
                                                            2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15,
                                                            0.15, 0.1, 0.07)))


def _englishness(text: str) -> float:
    """How far a text's letter frequencies are from English's (a chi-square per letter; lower is
    more English-like): a substitution cipher moves them, word order does not."""
    letters = [ch for ch in text.lower() if "a" <= ch <= "z"]
    if not letters:
        return float("inf")
    n = len(letters)
    counts = {ch: 0 for ch in _ENGLISH_LETTERS}
    for ch in letters:
        counts[ch] += 1
    return sum((counts[ch] - n * f / 100) ** 2 / (n * f / 100) for ch, f in _ENGLISH_LETTERS.items()) / n


_ATBASH = str.maketrans("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                        "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA")
_CIPHERED_SPAN = re.compile(r"[A-Za-z][A-Za-z ,.'?!]{14,}[A-Za-z.?!]")


def _ciphers(text: str) -> str:
    """Stretches of letters enciphered by ROT13 or Atbash, or written backwards, deciphered where
    the result reads as English and the stretch does not: by its letters for a substitution, by its
    common words for a reversal."""
    def sub(m: re.Match[str]) -> str:
        span = m.group(0)
        before = _wordiness(span)
        if before >= 0.3:
            return span  # already reads as English
        far = _englishness(span)
        for candidate in (codecs.encode(span, "rot13"), span.translate(_ATBASH)):
            if _englishness(candidate) < 0.5 * far and _wordiness(candidate) >= 0.1:
                return candidate
        backwards = span[::-1]
        return backwards if _wordiness(backwards) >= max(0.25, before + 0.2) else span

    return _CIPHERED_SPAN.sub(sub, text)


_ASSIGN = re.compile(r"\b([A-Za-z_]\w*)\s*=\s*(['\"])(.*?)\2")
_CONCAT = re.compile(r"\b[A-Za-z_]\w*(?:\s*\+\s*[A-Za-z_]\w*)+\b")


def _assembled(text: str) -> str:
    """Strings split into variables joined again where the text joins them (``a + b``)."""
    values = {m.group(1): m.group(3) for m in _ASSIGN.finditer(text)}
    if len(values) < 2:
        return text

    def join(m: re.Match[str]) -> str:
        names = [n.strip() for n in m.group(0).split("+")]
        if all(n in values for n in names):
            return " ".join(values[n] for n in names)
        return m.group(0)

    return _CONCAT.sub(join, text)


_DECODERS: list[tuple[str, Callable[[str], str]]] = [
    ("tags", lambda t: _TAGS.sub(lambda m: _tags(m.group(0)), t)),
    ("base64", lambda t: _replace(_BASE64, t, _b64)),
    ("base32", lambda t: _replace(_BASE32, t, lambda s: base64.b32decode(s + "=" * (-len(s) % 8)))),
    ("hex", lambda t: _replace(_HEX, t, _hex)),
    ("url", lambda t: _replace(_PERCENT, t, lambda s: urllib.parse.unquote(s, errors="strict"), _printable)),
    ("quoted-printable", lambda t: _replace(_QUOTED, t, lambda s: quopri.decodestring(s.encode()), _printable)),
    ("escapes", lambda t: _replace(_ESCAPES, t, lambda s: s.encode("latin-1").decode("unicode_escape"), _printable)),
    ("html", lambda t: _replace(_ENTITIES, t, html.unescape, _printable)),
    ("morse", lambda t: _replace(_MORSE, t, _morse)),
    ("braille", lambda t: _replace(_BRAILLE, t, _braille)),
    ("cipher", _ciphers),
    ("variables", _assembled),
]

#: Every step a canonical form may record, in the order they run.
STEPS = [*(name for name, _ in _PLAIN), *(f"decoded {name}" for name, _ in _DECODERS),
         *(name for name, _ in _NORMALISERS)]
