"""Turning what a caller passes (a string or a message list) into clean chat messages."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, TypeVar, Union

from .errors import InputError, InputTypeError

Message = Mapping[str, str]
PromptInput = Union[str, Sequence[Message]]

ROLES = ("system", "user", "assistant", "tool")
# Other vocabularies callers bring (LangChain message types, OpenAI's "developer").
_ROLE_ALIASES = {"human": "user", "ai": "assistant", "bot": "assistant", "model": "assistant",
                 "developer": "system", "function": "tool"}


def clean_text(text: str) -> str:
    """Replace lone surrogates (which tokenizers cannot encode) by U+FFFD; keep everything else."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def to_messages(prompt: Any) -> list[dict[str, str]]:
    """Normalise a prompt into a list of ``{"role", "content"}`` dicts.

    Accepts a string (one user turn), or a non-empty sequence of mappings with ``role`` and
    ``content`` keys, or of objects with ``role``/``type`` and ``content`` attributes.

    Raises:
        InputError: for any other input, naming the offending element and what is allowed.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": clean_text(prompt)}]
    if isinstance(prompt, (bytes, bytearray)):
        msg = "prompt must be a str or a list of messages, got bytes; decode it first (e.g. `data.decode('utf-8')`)"
        raise InputError(msg)
    if isinstance(prompt, Mapping) or not isinstance(prompt, Sequence):
        msg = (f"prompt must be a str or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}")
        raise InputError(msg)
    if len(prompt) == 0:
        raise InputError("prompt is an empty message list; give at least one user message")
    out = []
    for i, item in enumerate(prompt):
        if isinstance(item, Mapping):
            role, content = item.get("role"), item.get("content")
        else:
            role = getattr(item, "role", None) or getattr(item, "type", None)
            content = getattr(item, "content", None)
        if not isinstance(role, str):
            msg = f"message {i} has no string `role`; each message needs a role in {ROLES} and a string content"
            raise InputError(msg)
        role = _ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            msg = f"message {i} has role {role!r}; allowed roles are {ROLES}"
            raise InputError(msg)
        if not isinstance(content, str):
            msg = (f"message {i} ({role}) has content of type {type(content).__name__}; "
                   "only text content is supported")
            raise InputError(msg)
        out.append({"role": role, "content": clean_text(content)})
    return out


def system_text(system: str, current: str | None) -> str:
    """The text of the one system turn a conversation gets when ``system`` is added: ``system``
    first, then the caller's own system text (many chat templates and APIs allow one system turn)."""
    return f"{system}\n\n{current}" if current else system


M = TypeVar("M")


def _dict_system(message: Any) -> str | None:
    if isinstance(message, Mapping) and message.get("role") in ("system", "developer") \
            and isinstance(message.get("content"), str):
        return message["content"]
    return None


def _dict_merged(text: str, message: Any) -> Any:
    return {"role": "system", "content": text} if message is None else {**message, "content": text}


def with_system_prompt(messages: Sequence[M], system: str, *,
                       system_of: Callable[[M], str | None] = _dict_system,
                       make: Callable[[str, M | None], M] = _dict_merged) -> list[M]:
    """``messages`` with ``system`` first, merged into a leading system turn (:func:`system_text`).

    The default works on ``{"role", "content"}`` dicts (a ``developer`` turn counts as a system
    turn, other keys of a merged message are kept); an adapter passes its framework's own
    ``system_of`` (the text of a system message that can take the merge, else ``None``) and
    ``make`` (the system message with a text, built from the one it replaces or from ``None``).
    """
    current = system_of(messages[0]) if messages else None
    if current is not None:
        return [make(system_text(system, current), messages[0]), *messages[1:]]
    return [make(system, None), *messages]


def last_user_text(messages: Sequence[Message]) -> str:
    """The content of the last user message ('' if there is none)."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return ""


def render_plain(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The fallback template for tokenizers without a chat template."""
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


def check_prompt(prompt: Any) -> None:
    """Raise :class:`InputTypeError` if ``prompt`` is not a string or a sequence of messages.

    A wrong type is the caller's bug, so it raises at the call instead of becoming a refusal
    that looks like a verdict. A message list of the right shape whose content the guard cannot
    score (no text, an unknown role, an empty list) still fails closed in the guard.
    """
    if isinstance(prompt, str):
        return
    if isinstance(prompt, (bytes, bytearray)):
        raise InputTypeError("prompt must be a str or a list of messages, got bytes; decode it first "
                             "(e.g. `data.decode('utf-8')`)")
    if isinstance(prompt, Mapping):
        raise InputTypeError("prompt must be a str or a list of messages, got a single mapping; "
                             "wrap the message in a list: `[message]`")
    if not isinstance(prompt, Sequence):
        raise InputTypeError(f"prompt must be a str or a list of {{'role', 'content'}} messages, "
                             f"got {type(prompt).__name__}")
    for i, item in enumerate(prompt):
        if not (isinstance(item, Mapping) or hasattr(item, "content")):
            raise InputTypeError(f"message {i} of the prompt is a {type(item).__name__}; each message is a "
                                 "mapping (or message object) with `role` and `content`")


def check_prompts(prompts: Any) -> None:
    """Raise :class:`InputTypeError` unless ``prompts`` is a sequence of prompts (see :func:`check_prompt`).

    A bare string is refused: iterating it would score every character as its own prompt.
    """
    if isinstance(prompts, (str, bytes, bytearray)):
        raise InputTypeError(f"prompts must be a list of prompts, got a single {type(prompts).__name__}; "
                             "use `check`/`invoke` for one prompt, or wrap it in a list: `[prompt]`")
    if isinstance(prompts, Mapping) or not isinstance(prompts, Sequence):
        raise InputTypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        try:
            check_prompt(prompt)
        except InputTypeError as exc:
            raise InputTypeError(f"prompts[{i}]: {exc}") from None


def check_texts(texts: Any) -> None:
    """Raise :class:`InputTypeError` unless ``texts`` is a sequence of strings (content to judge)."""
    if isinstance(texts, (str, bytes, bytearray)) or isinstance(texts, Mapping) or not isinstance(texts, Sequence):
        raise InputTypeError(f"texts must be a list of strings, got {type(texts).__name__}; "
                             "use `check_content` for one text, or wrap it in a list: `[text]`")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputTypeError(f"texts[{i}] is a {type(text).__name__}; content to judge must be a str")
