"""Stop strings over the decoded text of a sequence, and how much of that text is safe to stream."""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"  # what a detokenizer shows for the first bytes of a character still being generated


def find_stop(text: str, stops: Sequence[str], searched: int) -> tuple[int, str] | None:
    """(where the text must end, the stop string) for the earliest stop string in text, or None.

    `searched`: the length of a text prefix already searched (it held none), so only the tail is searched again.
    """
    if not stops:
        return None
    lo = max(0, searched - max(len(s) for s in stops) + 1)
    hits = [(i, s) for s in stops if (i := text.find(s, lo)) >= 0]
    return min(hits) if hits else None


def streamable_length(text: str, stops: Sequence[str]) -> int:
    """Characters of text that can be streamed now: hold back a trailing partial character and the longest
    suffix that could still grow into a stop string (streamed text never contains a stop string)."""
    end = len(text.rstrip(INCOMPLETE))
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, end), held, -1):
            if text.endswith(s[:n], 0, end):
                held = n
                break
    return end - held
