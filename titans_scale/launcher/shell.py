"""Shell quoting for rendered scripts: user values become single words (shlex.quote); only
shell code written by titans-scale itself (class Shell) goes into a script as is."""

from __future__ import annotations

import shlex


class Shell(str):
    """Shell code written by titans-scale, e.g. '"$HEAD_NODE:$RDZV_PORT"': emitted unquoted.
    A value derived from user input must never be wrapped in Shell."""


def option(name: str, value: str) -> str:
    """`--name=value` as one word; still Shell code when the value is."""
    text = f"{name}={value}"
    return Shell(text) if isinstance(value, Shell) else text


def word(arg: str) -> str:
    return arg if isinstance(arg, Shell) else shlex.quote(arg)


def command(groups: list[list[str]], indent: str = "    ", width: int = 100) -> str:
    """One shell command from groups of words: each group on its own continued line."""
    lines: list[str] = []
    for group in groups:
        cur = indent if lines else ""
        for w in map(word, group):
            if cur.strip() and len(cur) + 1 + len(w) > width:
                lines.append(cur)
                cur = indent + w
            else:
                cur = f"{cur} {w}" if cur.strip() else cur + w
        lines.append(cur)
    return " \\\n".join(lines)
