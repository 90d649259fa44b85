"""Stop strings and what may be streamed before a stop string can be ruled out."""

from __future__ import annotations

from moe_runtime.generation.stopping import find_stop, streamable_length


def test_find_stop_returns_the_earliest_stop_and_searches_only_the_new_tail():
    assert find_stop("hello world", ["wor", "lo"], 0) == (3, "lo")
    assert find_stop("hello world", ["xyz"], 0) is None
    assert find_stop("abc", [], 0) is None
    # "ab" ends in the already searched prefix "xa" + new "b": still found (the tail overlaps by len - 1)
    assert find_stop("xab", ["ab"], 2) == (1, "ab")
    assert find_stop("abxx", ["ab"], 4) is None  # wholly inside the searched prefix: not searched again


def test_streamable_length_holds_back_partial_characters_and_stop_prefixes():
    assert streamable_length("hello", []) == 5
    assert streamable_length("hello\ufffd", []) == 5
    assert streamable_length("hello wo", ["world"]) == 6  # "wo" may become "world"
    assert streamable_length("hello w", ["world", "he"]) == 6
    assert streamable_length("hello", ["lo!"]) == 3
    assert streamable_length("hello", ["xyz"]) == 5
