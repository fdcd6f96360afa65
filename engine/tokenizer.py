"""Tokenizers: a byte-level default (ids 0..255 are bytes) and tokenizer.json via `tokenizers`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from engine.errors import ConfigError

SPECIALS = {"<|endoftext|>": 256, "<|im_end|>": 257, "<|im_start|>": 258}


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def special_id(self, name: str) -> int | None: ...


class ByteTokenizer:
    """Lossless for bytes: encode = UTF-8 bytes; ids >= 256 are special tokens."""

    def __init__(self, vocab_size: int = 384, eos_id: int | None = 257) -> None:
        if vocab_size < 259:
            raise ConfigError("the byte tokenizer needs vocab_size >= 259")
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._names = {v: k for k, v in SPECIALS.items()}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogateescape"))

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            out.append(self._names.get(i, f"<|{i}|>"))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def special_id(self, name: str) -> int | None:
        return SPECIALS.get(name)


class HFTokenizer:
    """A checkpoint's tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: Path, eos_id: int | None) -> None:
        from tokenizers import Tokenizer as _T

        try:
            self._tok = _T.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ConfigError(f"{path}: cannot load tokenizer ({e})") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = eos_id if eos_id is not None else self._tok.token_to_id("<|im_end|>")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))

    def special_id(self, name: str) -> int | None:
        return self._tok.token_to_id(name)


def load_tokenizer(checkpoint: Path | None, vocab_size: int,
                   eos_id: int | None) -> ByteTokenizer | HFTokenizer:
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").exists():
        return HFTokenizer(Path(checkpoint) / "tokenizer.json", eos_id)
    return ByteTokenizer(vocab_size, eos_id)
