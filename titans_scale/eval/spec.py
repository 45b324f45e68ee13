"""What a recall sweep asks: suite, lengths, depths, needle format (no torch at import, so
the CLI parser stays light)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from titans_scale.config_io import check_choices
from titans_scale.errors import ConfigError

Needle = Literal["passkey", "number", "word"]
Haystack = Literal["noise", "corpus"]
NEEDLES, HAYSTACKS = typing.get_args(Needle), typing.get_args(Haystack)     # the eval flags' choices


@dataclass
class EvalSweepSpec:
    suite: Literal["niah", "recall"]
    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 20
    seed: int = 10_000
    needle: Needle = "passkey"                   # niah only
    haystack: Haystack = "noise"
    digits: int = 5                              # pass key / magic number / MQAR value digits
    pairs: int = 0                               # recall: key-value pairs; 0 = min(8, length // 96)
    piece: int = 2048                            # tokens fed to the model per call

    def validate(self) -> "EvalSweepSpec":
        """Built from command-line flags (or in code), so the messages name the flags."""
        def bad(name, msg):
            raise ConfigError(f"{name}: {msg}")
        check_choices(self, lambda f: f"--{f}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            bad("--lengths", f"need positive token counts, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            bad("--depths", f"need depths in [0, 1], got {self.depths}")
        if self.samples < 1:
            bad("--samples", f"must be >= 1, got {self.samples}")
        if self.digits < 1:
            bad("--digits", f"must be >= 1, got {self.digits}")
        if self.piece < 1:
            bad("--piece", f"must be >= 1, got {self.piece}")
        return self

    @property
    def answer_kind(self) -> str:
        return "mqar" if self.suite == "recall" else self.needle

    def num_pairs(self, length: int) -> int:
        return self.pairs or max(1, min(8, length // 96))

    def sample(self, tokenizer, length: int, depth: float | None, i: int):
        """Sample i of a (length, depth) cell: seeded by seed + i, the same at every depth."""
        from titans_scale.data.synthetic import mqar_sample, needle_sample

        if self.suite == "niah":
            return needle_sample(tokenizer, length, self.seed + i, needle=self.needle, depth=depth,
                                 haystack=self.haystack, digits=self.digits)
        return mqar_sample(tokenizer, length, self.seed + i, num_pairs=self.num_pairs(length),
                           haystack=self.haystack, value_digits=self.digits)


__all__ = ["EvalSweepSpec", "NEEDLES", "HAYSTACKS"]
