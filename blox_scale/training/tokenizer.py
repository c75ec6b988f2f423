"""ByteTokenizer: UTF-8 bytes as tokens (vocab 256), no files, no training.

Byte-level tokens need nothing downloaded, so the default run works on any
machine; any text round-trips exactly, and decoding an arbitrary model output
never fails (invalid UTF-8 is shown as U+FFFD).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class ByteTokenizer:
  """`encode(str) -> list[int]` of UTF-8 bytes; `decode(ids) -> str`."""

  vocab_size: int = 256

  def encode(self, text: str) -> list[int]:
    """text -> token ids in [0, 256)."""
    return list(text.encode('utf-8'))

  def encode_array(self, data: str | bytes) -> np.ndarray:
    """text or raw bytes -> `uint8[n]` token ids (no Python list; large corpora)."""
    raw = data.encode('utf-8') if isinstance(data, str) else bytes(data)
    return np.frombuffer(raw, dtype=np.uint8)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """token ids -> text; ids outside [0, 256) raise, invalid UTF-8 becomes U+FFFD."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < 256]
    if bad:
      raise ValueError(f'ByteTokenizer.decode: ids must be in [0, 256), got {bad[:5]}. '
                       'Is the model vocab_size larger than the tokenizer?')
    return bytes(ids).decode('utf-8', errors='replace')

  def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
    return [self.decode(ids) for ids in batch]


# data.tokenizer: the built-in tokenizers by name.
TOKENIZERS = {'byte': ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
  """The tokenizer named by `data.tokenizer`."""
  if name in TOKENIZERS:
    return TOKENIZERS[name]()
  raise ValueError(f"data.tokenizer={name!r} is not known; the only built-in tokenizer is 'byte'. "
                   "For another vocabulary, pre-tokenize to a uint16/uint32 file and use data.source='tokens'.")
