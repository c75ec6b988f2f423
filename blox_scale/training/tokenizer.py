"""Tokenizers: `data.tokenizer` -> an object with `encode`, `decode`, `vocab_size`, `eos_id`, `bos_id`.

    'byte'                             ByteTokenizer: UTF-8 bytes, vocab 256, no files
    FILE.json, or a DIR holding         HuggingFaceTokenizer (the `tokenizers` library)
      tokenizer.json
    FILE.model, or a DIR holding        SentencePieceTokenizer (`sentencepiece`)
      only tokenizer.model

Byte-level tokens need nothing downloaded, so the default run works on any
machine; any text round-trips exactly. The file-based kinds read the files
other projects publish (a Hugging Face model directory, a Llama/T5
`tokenizer.model`).

Documents are joined the same way everywhere (the data pipeline, blox-tokenize):
each document is `[bos] + encode(doc)` (bos only when the tokenizer has one distinct
from its end-of-document token) and consecutive documents are separated by the
end-of-document token `eos_id`; the byte tokenizer, which has none, separates
them with a blank line (`DOCUMENT_SEPARATOR`), which reads naturally in samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from blox_scale.training.config import ConfigError

# The kinds `data.tokenizer` accepts; `tokenizer_kind` (called by config validation) maps a value to one.
TOKENIZER_KINDS = ('byte', 'huggingface', 'sentencepiece')
TOKEN_FILE_DTYPES = ('uint16', 'uint32')  # of token files (data.source='tokens')
HF_FILE = 'tokenizer.json'
HF_CONFIG_FILE = 'tokenizer_config.json'  # optional, beside tokenizer.json: names bos/eos tokens
SENTENCEPIECE_FILE = 'tokenizer.model'
# Where a run keeps its copy of a file-based tokenizer: <workdir>/tokenizer/.
RUN_TOKENIZER_DIR = 'tokenizer'
# Between documents for tokenizers without an end-of-document token (byte).
DOCUMENT_SEPARATOR = b'\n\n'
_SPEC_HELP = ("use 'byte', a Hugging Face tokenizer.json (or a directory holding one) "
              'or a SentencePiece .model file')


class TokenizerError(ConfigError):
  """`data.tokenizer` cannot be used (missing file, unknown kind, vocab mismatch); names the key (exit 2)."""


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype of a token file for ids in [0, vocab_size): uint16 or uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class Tokenizer:
  """What every tokenizer provides. Subclasses set `vocab_size`, `eos_id`, `bos_id`, `files`.

  `encode(str) -> list[int]` adds no special tokens; `decode(ids) -> str`
  drops special tokens. `eos_id`/`bos_id` are None when the tokenizer has none.
  """

  kind: str = ''
  vocab_size: int = 0
  eos_id: int | None = None
  bos_id: int | None = None
  files: tuple[Path, ...] = ()  # what `record` copies into a run's workdir

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """token ids -> text; ids outside [0, vocab_size) raise."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f'{type(self).__name__}.decode: ids must be in [0, {self.vocab_size}), got {bad[:5]}. '
                       'Is the model vocab_size larger than the tokenizer? (blox-sample samples only '
                       "ids of the tokenizer's vocab.)")
    return self._decode(ids)

  def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
    return [self.decode(ids) for ids in batch]

  @property
  def prepends_bos(self) -> bool:
    """Documents and prompts start with `bos_id` (a BOS distinct from the end-of-document token)."""
    return self.bos_id is not None and self.bos_id != self.eos_id

  def separator(self) -> list[int]:
    """Token ids between two documents: `[eos_id]`, or a blank line without one."""
    return [self.eos_id] if self.eos_id is not None else self.encode(DOCUMENT_SEPARATOR.decode())

  def encode_prompt(self, text: str) -> list[int]:
    """A prompt as the model saw document starts: `[bos] + encode(text)`."""
    return ([self.bos_id] if self.prepends_bos else []) + self.encode(text)

  def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text (subclasses batch it)."""
    return [self.encode(t) for t in texts]

  def encode_documents(self, docs: Sequence[str | bytes]) -> np.ndarray:
    """Documents -> one stream `[bos] doc0 <sep> [bos] doc1 ...` as `token_dtype(vocab_size)[n]`.

    Bytes are decoded as UTF-8 (invalid bytes become U+FFFD).
    """
    texts = [d.decode('utf-8', errors='replace') if isinstance(d, bytes) else d for d in docs]
    head, sep = ([self.bos_id] if self.prepends_bos else []), self.separator()
    parts = []
    for i, ids in enumerate(self.encode_texts(texts)):
      parts.append(np.asarray((sep if i else []) + head + ids, np.int64))
    stream = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    return stream.astype(token_dtype(self.vocab_size))

  def fingerprint(self) -> str:
    """sha256 of the tokenizer's files ('byte' for the byte tokenizer): identifies it in token files."""
    digest = hashlib.sha256()
    for path, name in _recorded_names(self).items():  # normalised names: a recorded copy has the same print
      digest.update(name.encode() + b'\0' + path.read_bytes())
    return digest.hexdigest()


class ByteTokenizer(Tokenizer):
  """`encode(str) -> list[int]` of UTF-8 bytes; `decode(ids) -> str` (invalid UTF-8 becomes U+FFFD)."""

  kind = 'byte'
  vocab_size = 256

  def encode(self, text: str) -> list[int]:
    """text -> token ids in [0, 256)."""
    return list(text.encode('utf-8'))

  def encode_array(self, data: str | bytes) -> np.ndarray:
    """text or raw bytes -> `uint8[n]` token ids (no Python list; large corpora)."""
    raw = data.encode('utf-8') if isinstance(data, str) else bytes(data)
    return np.frombuffer(raw, dtype=np.uint8)

  def encode_documents(self, docs: Sequence[str | bytes]) -> np.ndarray:
    """Documents joined by a blank line, as `uint8[n]` (bytes kept exactly, even invalid UTF-8)."""
    return self.encode_array(DOCUMENT_SEPARATOR.join(d.encode('utf-8') if isinstance(d, str) else bytes(d) for d in docs))

  def _decode(self, ids: list[int]) -> str:
    return bytes(ids).decode('utf-8', errors='replace')

  def fingerprint(self) -> str:
    return 'byte'


def _special_token_id(config: dict, key: str, vocab: dict[str, int], candidates: Sequence[str]) -> int | None:
  """`tokenizer_config.json`'s `key` ('eos_token' / 'bos_token') if given, else the first known name present."""
  token = config.get(key)
  if isinstance(token, dict):
    token = token.get('content')
  if isinstance(token, str):
    return vocab.get(token)
  return next((vocab[name] for name in candidates if name in vocab), None)


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (the `tokenizers` library, no `transformers`).

  bos/eos come from a `tokenizer_config.json` beside it when there is one
  (as Hugging Face model directories ship), else from the usual special
  token names (`<|endoftext|>`, `</s>`, ...; `<s>`, `<|begin_of_text|>`, ...).
  """

  kind = 'huggingface'
  EOS_NAMES = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>', '<|eos|>')
  BOS_NAMES = ('<s>', '<|begin_of_text|>', '<bos>', '<|startoftext|>')

  def __init__(self, path: str | Path):
    from tokenizers import Tokenizer as RustTokenizer
    path = Path(path)
    self._tok = RustTokenizer.from_file(str(path))
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    config_path = path.with_name(HF_CONFIG_FILE)
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    self.eos_id = _special_token_id(config, 'eos_token', vocab, [n for n in self.EOS_NAMES if n in special])
    self.bos_id = _special_token_id(config, 'bos_token', vocab, [n for n in self.BOS_NAMES if n in special])
    self.files = (path,) + ((config_path,) if config_path.exists() else ())

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def _decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file (`sentencepiece`), e.g. Llama's or T5's `tokenizer.model`."""

  kind = 'sentencepiece'

  def __init__(self, path: str | Path):
    import sentencepiece as spm
    path = Path(path)
    self._sp = spm.SentencePieceProcessor(model_file=str(path))
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.files = (path,)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def _decode(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


def tokenizer_kind(spec: str, key: str = 'data.tokenizer') -> str:
  """One of TOKENIZER_KINDS for a `data.tokenizer` value, from its form (only a directory is looked into).

  'byte'; a directory holding `tokenizer.json` (else `tokenizer.model`); a
  path ending in `.model` is SentencePiece; one ending in `.json`, or any
  other path with a '/', Hugging Face. Anything else (e.g. a hub name) raises.
  """
  if spec == 'byte':
    return 'byte'
  path = Path(os.path.expanduser(spec))
  if path.is_dir():
    sentencepiece_only = not (path / HF_FILE).is_file() and (path / SENTENCEPIECE_FILE).is_file()
    return 'sentencepiece' if sentencepiece_only else 'huggingface'
  if spec.endswith('.model'):
    return 'sentencepiece'
  if spec.endswith('.json') or os.sep in spec or '/' in spec:
    return 'huggingface'
  raise TokenizerError(f'{key}={spec!r}: not a tokenizer kind nor an existing directory; {_SPEC_HELP} '
                       '(no download: a Hugging Face hub name must be a local directory).')


def get_tokenizer(spec: str, key: str = 'data.tokenizer') -> Tokenizer:
  """The tokenizer named by `data.tokenizer` (see the module docstring); errors name `key`."""
  kind = tokenizer_kind(spec, key)
  if kind == 'byte':
    return ByteTokenizer()
  path = Path(os.path.expanduser(spec))
  if path.is_dir():
    found = [path / name for name in (HF_FILE, SENTENCEPIECE_FILE) if (path / name).is_file()]
    if not found:
      raise TokenizerError(f'{key}={spec!r}: the directory holds neither {HF_FILE} nor '
                           f'{SENTENCEPIECE_FILE}; point {key} at the tokenizer file itself.')
    path = found[0]
  elif not path.is_file():
    raise TokenizerError(f'{key}={spec!r}: no such file or directory; {_SPEC_HELP}.')
  try:
    if path.suffix == '.model':
      return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)
  except Exception as e:  # the Rust/C++ loaders raise plain Exception/RuntimeError/OSError
    raise TokenizerError(f'{key}={spec!r}: {path} is not a readable '
                         f"{'SentencePiece model' if path.suffix == '.model' else 'Hugging Face tokenizer.json'} "
                         f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); {_SPEC_HELP}.') from e


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, spec: str, *, key: str = 'data.tokenizer',
                model_key: str = 'model.vocab_size') -> None:
  """`model.vocab_size` must hold every id of the tokenizer (a larger, padded vocab is fine)."""
  if model_vocab_size < tokenizer.vocab_size:
    padded = -(-tokenizer.vocab_size // 128) * 128
    raise TokenizerError(
        f'{model_key}={model_vocab_size} is smaller than the vocabulary of {key}={spec!r} '
        f'({tokenizer.vocab_size} tokens); set {model_key}={tokenizer.vocab_size} or larger '
        f'(padded to a multiple of 128: {padded}), or use the tokenizer the model was trained with.')


# -----------------------------------------------------------------------------
# A run's tokenizer: copied into the workdir so the run is self-contained
# -----------------------------------------------------------------------------


def _recorded_names(tokenizer: Tokenizer) -> dict[Path, str]:
  """source file -> its normalised name in `<workdir>/tokenizer/`."""
  return {p: (SENTENCEPIECE_FILE if p.suffix == '.model' else HF_CONFIG_FILE if p.name == HF_CONFIG_FILE else HF_FILE)
          for p in tokenizer.files}


def check_recorded(tokenizer: Tokenizer, workdir: str | Path) -> None:
  """A run resumed with a different tokenizer than the one recorded in its workdir is an error."""
  target = Path(workdir) / RUN_TOKENIZER_DIR
  if not target.is_dir():
    return
  recorded = get_tokenizer(str(target))
  if recorded.fingerprint() != tokenizer.fingerprint():
    shown = ', '.join(map(str, tokenizer.files)) or "'byte'"
    raise TokenizerError(f'data.tokenizer: {shown} differs from the tokenizer recorded with this run in {target}; '
                         f'resume with the recorded one (data.tokenizer={str(target)!r}) or train in a fresh '
                         'train.workdir.')


def record(tokenizer: Tokenizer, workdir: str | Path) -> None:
  """Copies a file-based tokenizer's files into `<workdir>/tokenizer/` (nothing for 'byte').

  Names are normalised (`tokenizer.json` + `tokenizer_config.json`, or
  `tokenizer.model`) so `get_tokenizer(<workdir>/tokenizer)` reads it back;
  `check_recorded` first (a different tokenizer than the recorded one raises).
  """
  check_recorded(tokenizer, workdir)
  if not tokenizer.files:
    return
  target = Path(workdir) / RUN_TOKENIZER_DIR
  target.mkdir(parents=True, exist_ok=True)
  for source, name in _recorded_names(tokenizer).items():
    tmp = target / (name + '.tmp')
    shutil.copyfile(source, tmp)
    tmp.replace(target / name)  # atomic: a reader never sees half a file


def run_tokenizer(workdir: str | Path, spec: str) -> Tokenizer:
  """The tokenizer of a run: its recorded copy in `<workdir>/tokenizer/`, else `spec` ('byte')."""
  recorded = Path(workdir) / RUN_TOKENIZER_DIR
  return get_tokenizer(str(recorded)) if recorded.is_dir() else get_tokenizer(spec)
