"""The tokenizer an exported folder carries, as files transformers' AutoTokenizer loads.

A tokenizer.json run is exported with that file byte for byte (its fingerprint is its bytes)
plus a tokenizer_config.json naming PreTrainedTokenizerFast and the special tokens.

The byte tokenizer (data.tokenizer="byte": UTF-8 bytes are ids 0..255, bos/eos/pad 256..258)
becomes an equivalent tokenizer.json: a byte-level BPE with no merges, so every byte is one token
whose id is the byte's value, and <bos>, <eos>, <pad> as added tokens 256, 257, 258.
tests/hf checks that it encodes and decodes as data.tokenizer.ByteTokenizer does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from titans_scale.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TOKENIZER_FILE = "tokenizer.json"
BYTE_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}


def _byte_symbols() -> list[str]:
    """The character byte-level BPE writes for each byte (the ByteLevel pre-tokenizer's
    alphabet): printable Latin-1 bytes stand for themselves, the others, in byte order,
    for the characters from U+0100 on."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def byte_tokenizer_json():
    """ByteTokenizer as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    tok = Tokenizer(models.BPE(vocab={s: b for b, s in enumerate(_byte_symbols())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    b = ByteTokenizer()
    for name, want in (("bos_token", b.bos_id), ("eos_token", b.eos_id), ("pad_token", b.pad_id)):
        tok.add_special_tokens([AddedToken(BYTE_SPECIALS[name], special=True)])
        assert tok.token_to_id(BYTE_SPECIALS[name]) == want, name
    return tok


def save_tokenizer(spec: str | Path, folder: str | Path) -> dict:
    """Write the tokenizer `spec` ("byte" or a tokenizer.json path, as data.tokenizer) into
    `folder`; returns what the model config records: titans_tokenizer and the special token ids."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    folder = Path(folder)
    tok = load_tokenizer(spec)
    if isinstance(tok, HFTokenizer):
        ids = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
        specials = {k: tok._tok.id_to_token(i) for k, i in ids.items() if i is not None}
        fast = PreTrainedTokenizerFast(tokenizer_file=str(tok.path), **specials)
        kind = TOKENIZER_FILE
    else:
        specials = dict(BYTE_SPECIALS)
        # text that spells "<eos>" is those five bytes, as ByteTokenizer encodes it
        fast = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer_json(), split_special_tokens=True, **specials)
        kind = "byte"
    fast.save_pretrained(str(folder))
    if isinstance(tok, HFTokenizer):                  # the training file itself, not a re-serialisation
        shutil.copyfile(tok.path, folder / TOKENIZER_FILE)
    return {"titans_tokenizer": kind, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id}


__all__ = ["BYTE_SPECIALS", "TOKENIZER_FILE", "byte_tokenizer_json", "save_tokenizer"]
