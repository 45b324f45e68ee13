"""The fault suite's own tallies: faults injected / survived (a kill -9 or a failed write, then an
exact resume or a clean stop) and bad inputs tried / refused cleanly (one line, no traceback, the
run folder or convert source untouched). Each case records its try, and its
success only once every check after it held, so a failing check leaves the tally short and the
session summary names the case (conftest.py fails the session unless every tally is 100%)."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

FAULTS, INPUTS = "faults", "bad inputs"
COUNTS: dict[str, Counter] = {FAULTS: Counter(), INPUTS: Counter()}
FAILED: dict[str, list[str]] = {FAULTS: [], INPUTS: []}


@contextmanager
def cases(kind: str):
    """Count the cases of `kind` (FAULTS or INPUTS) the block names by calling the yielded
    function once per fault injected or input tried: all pass if the block returns (its checks
    held), all fail if it raises."""
    names: list[str] = []
    try:
        yield names.append
    except BaseException:
        COUNTS[kind]["tried"] += len(names)
        FAILED[kind].extend(names)
        raise
    COUNTS[kind]["tried"] += len(names)
    COUNTS[kind]["passed"] += len(names)


@contextmanager
def case(kind: str, name: str):
    """One case of `kind`, passed if the block returns."""
    with cases(kind) as add:
        add(name)
        yield


def summary() -> list[str]:
    """One line per kind that was exercised: 'faults: 7 injected, 7 survived (100%)'."""
    words = {FAULTS: ("injected", "survived with exact resume or a clean stop"),
             INPUTS: ("tried", "refused cleanly")}
    lines = []
    for kind, c in COUNTS.items():
        if c["tried"]:
            tried, passed = words[kind]
            line = f"{kind}: {c['tried']} {tried}, {c['passed']} {passed} ({100 * c['passed'] / c['tried']:.0f}%)"
            if FAILED[kind]:
                line += "; failed: " + ", ".join(FAILED[kind])
            lines.append(line)
    return lines


def complete() -> bool:
    return all(c["passed"] == c["tried"] for c in COUNTS.values())
