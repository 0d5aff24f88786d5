"""Shard-list patterns as webdataset and img2dataset users write them: brace groups, then shell globs.

`expand_braces` turns a pattern into the patterns it stands for, as webdataset's `braceexpand` and the shell do:

    {00000..00099}   a range of whole numbers, ascending, zero-padded to the widest bound when a bound is
                     zero-padded (`{0..10}` is 0, 1, ..., 10; `{00..10}` is 00, 01, ..., 10)
    {train,val}      a list of alternatives (each may hold brace groups itself)
    {} or {name}     no comma and no `..`: kept literally, as `braceexpand` keeps them

Several groups give their cartesian product, the leftmost varying slowest, which keeps shard order for
`{00..01}-{a,b}` = 00-a, 00-b, 01-a, 01-b. A group that looks like a range but is not an ascending range of whole
numbers (`{5..1}`, `{a..}`, `{1..z}`), or an unbalanced brace, is a `PatternError` naming the pattern: silently
taking it literally would only resurface later as "no files match". `match` then globs each expansion.
"""

from __future__ import annotations

import glob
import re

_RANGE = re.compile(r"(\d+)\.\.(\d+)")


class PatternError(ValueError):
    """A pattern that is malformed or names no file; the message names the pattern."""


def _closing(pattern: str, start: int) -> int:
    """The index of the `}` that closes the `{` at `start`."""
    depth = 0
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            return i
    raise PatternError(f"unbalanced '{{' in {pattern}")


def _split_commas(body: str) -> list[str]:
    """`body` split at its top-level commas (commas inside nested groups stay)."""
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    return parts + [body[last:]]


def _range(body: str, pattern: str) -> list[str]:
    m = _RANGE.fullmatch(body)
    if not m or int(m[1]) > int(m[2]):
        raise PatternError(f"bad brace range {{{body}}} in {pattern}: expected {{first..last}} with whole "
                           f"numbers, first <= last (e.g. {{00000..00099}})")
    padded = any(len(b) > 1 and b.startswith("0") for b in (m[1], m[2]))
    width = max(len(m[1]), len(m[2])) if padded else 0
    return [f"{i:0{width}d}" for i in range(int(m[1]), int(m[2]) + 1)]


def _alternatives(body: str, pattern: str) -> list[str]:
    """What one brace group `{body}` stands for."""
    parts = _split_commas(body)
    if len(parts) > 1:
        return [x for part in parts for x in _expand(part, pattern)]
    if ".." in body and "{" not in body:
        return _range(body, pattern)
    return ["{" + x + "}" for x in _expand(body, pattern)]  # literal braces; groups inside still expand


def _expand(text: str, pattern: str) -> list[str]:
    start = text.find("{")
    head = text if start < 0 else text[:start]
    if "}" in head:
        raise PatternError(f"unbalanced '}}' in {pattern}")
    if start < 0:
        return [text]
    end = _closing(text, start)
    tails = _expand(text[end + 1:], pattern)
    return [head + alt + tail for alt in _alternatives(text[start + 1:end], pattern) for tail in tails]


def expand_braces(pattern: str) -> list[str]:
    """The patterns `pattern`'s brace groups stand for, in order (see the module docstring)."""
    return _expand(pattern, pattern)


def match(pattern: str, recursive: bool = False) -> list[str]:
    """The paths `pattern` names: its brace expansions, each globbed (sorted), in expansion order.

    Every expansion must match something: an explicit range like `{00000..00099}` names exact shards, and one
    missing from it is more likely a failed download than something to skip silently.
    """
    expansions = expand_braces(pattern)
    found = [sorted(glob.glob(p, recursive=recursive)) for p in expansions]
    missing = [p for p, paths in zip(expansions, found) if not paths]
    if len(missing) == len(expansions):
        raise PatternError(f"no files match {pattern}")
    if missing:
        raise PatternError(f"{pattern} names {len(expansions)} paths and {len(missing)} of them match no file, "
                           f"e.g. {missing[0]}")
    return [path for paths in found for path in paths]
