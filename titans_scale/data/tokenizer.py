"""Tokenizers: raw bytes (the default; needs no files) or a local Hugging Face tokenizer.json.

Each tokenizer has a stable `fingerprint()`. Shards and checkpoints record it, so data
tokenized with one tokenizer is never silently fed to a model trained with another.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from titans_scale.errors import DataError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; bos/eos/pad are 256/257/258."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # Specials carry no text; a sequence cut inside a UTF-8 character decodes to U+FFFD.
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return f"byte-v1:vocab={self.vocab_size}"

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# Special tokens looked up in a tokenizer.json, most common spellings first.
_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>")
_EOS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")
_PAD = ("<pad>", "<|pad|>", "[PAD]")


class HFTokenizer:
    """A local `tokenizer.json` through the `tokenizers` package (no network)."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer: no file '{p}'; pass 'byte' or the path of a tokenizer.json")
        from tokenizers import Tokenizer as _Tok

        raw = p.read_bytes()
        try:
            self._tok = _Tok.from_str(raw.decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"tokenizer: '{p}' is not a valid tokenizer.json ({first}); "
                            "pass 'byte' or a tokenizer.json saved by the tokenizers library") from None
        self.path = p
        self._digest = hashlib.sha256(raw).hexdigest()[:16]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(_BOS)
        self.eos_id = self._find(_EOS)
        self.pad_id = self._find(_PAD)

    def _find(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        # The file's bytes: any change to vocab, merges or normalisation changes it.
        return f"hf-sha256:{self._digest}:vocab={self.vocab_size}"

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


def load_tokenizer(spec: str | Path = "byte") -> ByteTokenizer | HFTokenizer:
    """`"byte"` or the path of a tokenizer.json (or of a folder holding one)."""
    if isinstance(spec, str) and spec.strip().lower() == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def check_fingerprint(expected: str, tokenizer: Tokenizer, what: str) -> None:
    """Refuse data/checkpoints made with another tokenizer."""
    got = tokenizer.fingerprint()
    if got != expected:
        raise DataError(f"tokenizer mismatch: {what} used tokenizer '{expected}' but this run uses "
                        f"'{got}'; use the same tokenizer or prepare the data again with this one")


__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "check_fingerprint"]
