"""Tokenizers: a byte-level one that needs no files, and Hugging Face `tokenizer.json`."""

from __future__ import annotations

import os

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids: bos=0, eos=1, byte b -> b + 2."""

    bos_id, eos_id, offset = 0, 1, 2
    vocab_size = 258
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset and int(i) < 256 + self.offset)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. DeepSeek's) through the `tokenizers` package."""

    def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None):
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        self.name = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)

        def find(explicit, candidates):
            for c in ([explicit] if explicit else []) + candidates:
                if c in vocab:
                    return vocab[c]
            return None

        self.bos_id = find(bos_token, ["<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>"])
        self.eos_id = find(eos_token, ["<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str):
    """'bytes' for the byte-level tokenizer, else a path to tokenizer.json (or its folder)."""
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)
