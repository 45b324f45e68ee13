"""Long-range recall tasks: needle-in-a-haystack and multi-query associative recall (MQAR).

A sample is a token stream of an exact length with answer tokens at known positions:

* needle: intro, haystack, a needle sentence at a chosen depth, more haystack, a question;
  the stream ends with the answer (a pass key, a number or a word).
* mqar: key-value sentences spread through a haystack, then queries, each followed by
  its answer.

Samples are lazy: `stream(chunk_len)` yields the tokens in chunks, so a 1M-token sample
never exists in memory at once, and the chunks do not depend on how it is cut. The
haystack is noise sentences or the embedded stdlib corpus. Everything is a function of
the seed. Text is encoded part by part (haystack pieces, needle, question, answer), so
answer positions are exact for any tokenizer.

`recall_batch` builds fixed-length training batches with a loss mask on the answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import numpy as np
import torch

from titans_scale.data.corpus import iter_stdlib_text
from titans_scale.data.tokenizer import Tokenizer
from titans_scale.errors import DataError

Haystack = Literal["noise", "corpus"]

_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.", "The river flows to the sea.", "Birds sing in the morning.",
          "The road is long and quiet.")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_PIECE_SENTENCES = 64  # noise sentences encoded at a time


def _rng(*xs: int) -> np.random.Generator:
    return np.random.default_rng([int(x) % (1 << 64) for x in xs])


def _word(rng: np.random.Generator, syllables: int = 3) -> str:
    """A pronounceable pseudo-word: an unbounded vocabulary with no word list to ship."""
    return "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(syllables))


def _number(rng: np.random.Generator, digits: int) -> str:
    if digits < 1:
        raise DataError(f"digits={digits} must be >= 1")
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _haystack_pieces(tokenizer: Tokenizer, haystack: str, seed: int) -> Iterator[np.ndarray]:
    """Endless haystack tokens, in pieces whose boundaries depend only on the seed."""
    rng = _rng(seed, 1)
    if haystack == "noise":
        while True:
            idx = rng.integers(len(_NOISE), size=_PIECE_SENTENCES)
            yield tokenizer.encode_array(" ".join(_NOISE[i] for i in idx) + " ")
    elif haystack == "corpus":
        for text in iter_stdlib_text(start=int(rng.integers(1 << 30))):
            toks = tokenizer.encode_array(text + "\n")
            if len(toks):
                yield toks
    else:
        raise DataError(f"haystack='{haystack}' is not known; use 'noise' or 'corpus'")


class _Taker:
    """Takes exact token counts from an endless piece iterator, keeping the remainder."""

    def __init__(self, pieces: Iterator[np.ndarray]) -> None:
        self._pieces = pieces
        self._buf = np.empty(0, dtype=np.int64)

    def take(self, n: int) -> Iterator[np.ndarray]:
        while n > 0:
            if not len(self._buf):
                self._buf = np.asarray(next(self._pieces), dtype=np.int64)
                continue
            k = min(n, len(self._buf))
            yield self._buf[:k]
            self._buf, n = self._buf[k:], n - k


# A part is either token ids (fixed text) or an int (that many haystack tokens).
Part = np.ndarray | int


@dataclass(frozen=True)
class RecallSample:
    task: str
    length: int                        # tokens in the whole stream
    answers: tuple[str, ...]           # the values to recall, in order (e.g. "68203")
    answer_tokens: np.ndarray          # the answers' tokens, concatenated (int64)
    answer_positions: np.ndarray       # their positions in the stream (int64, ascending)
    needle_spans: tuple[tuple[int, int], ...]  # [start, end) of each needle / key-value sentence
    _parts: tuple[Part, ...]
    _haystack: Callable[[], Iterator[np.ndarray]]

    @property
    def prompt_len(self) -> int:
        """Tokens before the first answer token: what a model reads before it must answer."""
        return int(self.answer_positions[0])

    def _pieces(self) -> Iterator[np.ndarray]:
        taker = _Taker(self._haystack())
        for part in self._parts:
            if isinstance(part, np.ndarray):
                if len(part):
                    yield part
            else:
                yield from taker.take(part)

    def stream(self, chunk_len: int = 1 << 16, stop: int | None = None) -> Iterator[np.ndarray]:
        """The tokens [0, stop) in int64 chunks of `chunk_len` (the last may be shorter)."""
        if chunk_len < 1:
            raise DataError(f"chunk_len={chunk_len} must be >= 1")
        left = self.length if stop is None else max(0, min(stop, self.length))  # still to collect
        buf: list[np.ndarray] = []
        have = 0
        for piece in self._pieces():
            if left <= 0:
                break
            piece = piece[:left]
            left -= len(piece)
            buf.append(piece)
            have += len(piece)
            if have >= chunk_len:
                flat = np.concatenate(buf)
                full = have // chunk_len
                for c in range(full):
                    yield flat[c * chunk_len:(c + 1) * chunk_len].copy()
                buf, have = [flat[full * chunk_len:]], have - full * chunk_len
        if have:
            yield np.concatenate(buf).copy()

    def tokens(self) -> np.ndarray:
        """The whole stream at once (for lengths that fit in memory)."""
        return np.concatenate(list(self.stream(max(self.length, 1))))


def _build(task: str, parts: list[Part], answers: list[str], answer_parts: list[int], needle_parts: list[int],
           tokenizer: Tokenizer, haystack: str, seed: int) -> RecallSample:
    starts, pos = [], 0
    for p in parts:
        starts.append(pos)
        pos += len(p) if isinstance(p, np.ndarray) else p
    ans_pos = np.concatenate([np.arange(starts[i], starts[i] + len(parts[i])) for i in answer_parts])
    ans_tok = np.concatenate([parts[i] for i in answer_parts])
    spans = tuple((starts[i], starts[i] + len(parts[i])) for i in needle_parts)
    return RecallSample(task, pos, tuple(answers), ans_tok, ans_pos.astype(np.int64), spans, tuple(parts),
                        lambda: _haystack_pieces(tokenizer, haystack, seed))


def _fill(length: int, fixed: int, what: str) -> int:
    free = length - fixed
    if free < 0:
        raise DataError(f"{what}: length={length} is too short; this sample needs at least {fixed} tokens")
    return free


NeedleKind = Literal["passkey", "number", "word"]


def needle_sample(tokenizer: Tokenizer, length: int, seed: int, *, needle: NeedleKind = "passkey",
                  depth: float | None = None, haystack: Haystack = "noise", digits: int = 5) -> RecallSample:
    """Needle in a haystack of exactly `length` tokens, ending with the answer.

    depth: where the needle sits in the haystack, 0 = start, 1 = end; None draws it from the seed.
    """
    rng = _rng(seed, 0)
    if depth is None:
        depth = float(rng.random())
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"depth={depth} must be in [0, 1]")
    enc = tokenizer.encode_array
    intro = "There is important information hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    if needle == "passkey":
        value = _number(rng, digits)
        needle_text = f" The pass key is {value}. Remember it. {value} is the pass key. "
        question = "\nWhat is the pass key? The pass key is"
    elif needle in ("number", "word"):
        key = _word(rng)
        value = _number(rng, digits) if needle == "number" else _word(rng)
        noun = "number" if needle == "number" else "word"
        needle_text = f" The special magic {noun} for {key} is: {value}. "
        question = f"\nWhat is the special magic {noun} for {key}? The special magic {noun} for {key} is:"
    else:
        raise DataError(f"needle='{needle}' is not known; use 'passkey', 'number' or 'word'")
    fixed = [enc(intro), enc(needle_text), enc(question), enc(" " + value)]
    free = _fill(length, sum(map(len, fixed)), f"needle task ({needle})")
    before = int(round(depth * free))
    parts: list[Part] = [fixed[0], before, fixed[1], free - before, fixed[2], fixed[3]]
    return _build("needle", parts, [value], [5], [2], tokenizer, haystack, seed)


def mqar_sample(tokenizer: Tokenizer, length: int, seed: int, *, num_pairs: int = 8, num_queries: int | None = None,
                haystack: Haystack = "noise", value_digits: int = 4) -> RecallSample:
    """Multi-query associative recall: `num_pairs` key-value sentences at random places in a
    haystack, then `num_queries` distinct keys asked in random order, each answered."""
    num_queries = num_pairs if num_queries is None else num_queries
    if num_pairs < 1 or not 1 <= num_queries <= num_pairs:
        raise DataError(f"mqar: need num_pairs >= 1 and 1 <= num_queries <= num_pairs "
                        f"(got {num_pairs}, {num_queries})")
    rng = _rng(seed, 0)
    keys: list[str] = []
    while len(keys) < num_pairs:
        k = _word(rng)
        if k not in keys:
            keys.append(k)
    values = [_number(rng, value_digits) for _ in keys]
    asked = [int(i) for i in rng.permutation(num_pairs)[:num_queries]]

    enc = tokenizer.encode_array
    intro = enc("Remember the value of each key.\n")
    pairs = [enc(f" The value of key {k} is {v}. ") for k, v in zip(keys, values)]
    tail: list[np.ndarray] = [enc("\nAnswer:")]
    for n, i in enumerate(asked):
        tail += [enc(("." if n else "") + f"\nThe value of key {keys[i]} is"), enc(" " + values[i])]
    fixed = len(intro) + sum(map(len, pairs)) + sum(map(len, tail))
    free = _fill(length, fixed, f"mqar task ({num_pairs} pairs)")
    cuts = np.sort(rng.integers(0, free + 1, size=num_pairs))
    gaps = np.diff(np.concatenate([[0], cuts, [free]]))
    parts: list[Part] = [intro]
    needle_parts = []
    for g, p in zip(gaps[:-1], pairs):
        parts.append(int(g))
        needle_parts.append(len(parts))
        parts.append(p)
    parts.append(int(gaps[-1]))
    first_tail = len(parts)
    parts += tail
    answer_parts = [first_tail + 2 + 2 * n for n in range(num_queries)]
    return _build("mqar", parts, [values[i] for i in asked], answer_parts, needle_parts, tokenizer, haystack, seed)


_TASKS = {"needle": needle_sample, "mqar": mqar_sample}


def recall_batch(tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int, *, step: int = 0,
                 task: Literal["needle", "mqar"] = "mqar",
                 **task_kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch of recall samples: inputs, targets (int64 [B, L]) and loss_mask (bool [B, L]).

    loss_mask[b, t] is True where targets[b, t] is an answer token, so a recall loss is
    `(ce * mask).sum() / mask.sum()`. Sample i of batch `step` is seeded by (seed, step, i).
    """
    if task not in _TASKS:
        raise DataError(f"task='{task}' is not known; use one of {', '.join(_TASKS)}")
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    inputs = torch.empty(batch_size, seq_len, dtype=torch.int64)
    targets = torch.empty(batch_size, seq_len, dtype=torch.int64)
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    for b in range(batch_size):
        sample_seed = int(np.random.SeedSequence([seed % (1 << 64), step, b]).generate_state(1, np.uint64)[0])
        s = _TASKS[task](tokenizer, seq_len + 1, sample_seed, **task_kwargs)
        toks = torch.from_numpy(s.tokens())
        inputs[b], targets[b] = toks[:-1], toks[1:]
        mask[b, torch.from_numpy(s.answer_positions - 1)] = True
    return inputs, targets, mask


# The needle as bare tokens (issue 19's "does the memory recall at all" task): a haystack of
# random bytes HAY_LO..255, the pair [MARK, value] at the needle's depth, and MARK again as the
# last input, whose target is the value: one of TOKEN_VALUES bytes 0..7 (chance 1/8). No text,
# no format to learn first. Without distractors the value is the only byte below HAY_LO in the
# row, so remembering which one appeared is enough (presence); `distractors` scatters that many
# more value bytes, without a MARK before them, so only the association MARK -> value answers.
MARK, TOKEN_VALUES, HAY_LO = 8, 8, 16


def token_needle_batch(batch_size: int, seq_len: int, seed: int, *, step: int = 0,
                       depth: float = 0.2, distractors: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs, targets, loss_mask as recall_batch; only the last position is scored. At depth d the
    needle's value sits (1 - d) * (seq_len - 3) + 1 tokens before the question; `distractors`
    other value bytes sit at random haystack positions (never right after a MARK)."""
    if seq_len < 4 or not 0 <= depth <= 1:
        raise DataError(f"seq_len={seq_len} must be >= 4 and depth={depth} in [0, 1]")
    if not 0 <= distractors <= seq_len - 4:
        raise DataError(f"distractors={distractors} must be in [0, seq_len - 4 = {seq_len - 4}]")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    toks = torch.randint(HAY_LO, 256, (batch_size, seq_len + 1), generator=g)
    value = torch.randint(0, TOKEN_VALUES, (batch_size,), generator=g)
    at = int(round(depth * (seq_len - 3)))
    if distractors:       # drawn after the rest: rows without distractors are as before
        free = torch.tensor([p for p in range(seq_len - 1) if p not in (at, at + 1)])
        for row in range(batch_size):
            pos = free[torch.randperm(len(free), generator=g)[:distractors]]
            toks[row, pos] = torch.randint(0, TOKEN_VALUES, (distractors,), generator=g)
    toks[:, at], toks[:, at + 1], toks[:, seq_len - 1], toks[:, seq_len] = MARK, value, MARK, value
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    mask[:, seq_len - 1] = True
    return toks[:, :-1], toks[:, 1:], mask


__all__ = ["RecallSample", "needle_sample", "mqar_sample", "recall_batch", "token_needle_batch"]
