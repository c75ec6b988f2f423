"""Data: a token stream, packed into windows, shuffled and batched with grain.

    corpus (1-d token stream: stdlib source | text files | token file | ArrayRecord)
      -> PackedWindows: window i = tokens[i*T : i*T + T + 1]      (T = seq_len)
         -> {'inputs': int32[T], 'targets': int32[T], 'mask': float32[T]}
            (+ 'segment_ids', 'positions': int32[T] with data.packing='document')
      -> train: grain MapDataset .shuffle(seed) .repeat() .batch(rows per process)
                [first::chunks_per_batch]  -> this process's rows of each global batch
                [global_batch:]            -> GlobalBatches, resumed at the checkpoint's global batch index
      -> eval:  the last `eval_fraction` of the windows, in order

Every batch is a pure function of its index: global batch `i` is windows
`[i*B, (i+1)*B)` of the shuffled stream (a function of `data.shuffle_seed`,
`i` and `data.batch_size` only), whatever the process count, and a process
reads only its rows of it. The data position saved with every checkpoint is
therefore global (`GlobalBatches.get_state()`: the next global batch index plus
what fixes the stream: batch size, seq_len, seed, source, packing, a corpus
fingerprint), so a run resumed on any number of processes, devices or mesh shape
continues with exactly the global batches it would have seen (elastic resume,
docs/scaling.md); `check_resume_state` refuses a resume whose data settings
would change them.

The default corpus is this Python's own standard library source, read from
the running interpreter: it exists on every machine with no download.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from blox_scale.training.config import ConfigError, DataConfig
from blox_scale.training.disk import writing
from blox_scale.training.tokenizer import (DOCUMENT_SEPARATOR, TOKEN_FILE_DTYPES, ByteTokenizer, Tokenizer,
                                           TokenizerError, check_vocab, get_tokenizer)

Batch = dict[str, np.ndarray]


# -----------------------------------------------------------------------------
# Corpora: each returns one 1-d token stream
# -----------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
  """The standard library's `*.py` files, sorted by relative path (deterministic).

  Third-party packages installed inside the stdlib directory (site-packages,
  dist-packages) and the generated build settings (`_sysconfigdata*`) are
  excluded: they differ between machines.
  """
  root = Path(sysconfig.get_paths()['stdlib'])
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ('site-packages', 'dist-packages', '__pycache__'))
    files.extend(Path(dirpath) / f for f in filenames if f.endswith('.py') and not f.startswith('_sysconfigdata'))
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(max_bytes: int) -> list[bytes]:
  """The stdlib files' contents, in `stdlib_files` order, while each plus a separator fits `max_bytes`.

  The last document is cut so that the documents, each followed by
  `DOCUMENT_SEPARATOR`, fill exactly `max_bytes` (`stdlib_corpus`).
  """
  docs, total = [], 0
  for path in stdlib_files():
    if total >= max_bytes:
      break
    try:
      raw = path.read_bytes()
    except OSError:
      continue  # unreadable file (permissions): skip, the rest is deterministic
    docs.append(raw[:max_bytes - total])
    total += len(raw) + len(DOCUMENT_SEPARATOR)
  if not docs:
    raise FileNotFoundError(f"No Python source found under {sysconfig.get_paths()['stdlib']} for data.source='stdlib'. "
                            "Use data.source='text' data.path=YOUR_FILES instead.")
  return docs


def stdlib_corpus(max_bytes: int) -> bytes:
  """The concatenated stdlib source, at most `max_bytes` long (whole files first, each + a blank line)."""
  return b''.join(doc + DOCUMENT_SEPARATOR for doc in stdlib_documents(max_bytes))[:max_bytes]


def _expand(pattern: str, key: str) -> list[str]:
  if not pattern:
    raise ConfigError(f'{key}={pattern!r}: empty; set data.path=FILE_OR_GLOB.')
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise ConfigError(f'{key}={pattern!r}: matches no file; check the path.')
  return paths


# -- token files (data.source='tokens', written by blox-tokenize) ---------------------------------


def token_meta_path(path: str | Path) -> Path:
  """The JSON sidecar of a token file: `<path>.json` (dtype, tokenizer, counts)."""
  return Path(f'{path}.json')


def write_token_meta(path: str | Path, meta: dict[str, Any]) -> None:
  """Writes the sidecar of the token file at `path` (atomically)."""
  target = token_meta_path(path)
  tmp = target.with_name(target.name + '.tmp')
  tmp.write_text(json.dumps(meta, indent=1) + '\n')
  tmp.replace(target)


def read_token_meta(path: str | Path) -> dict[str, Any] | None:
  """The sidecar of the token file at `path`, or None when it has none."""
  meta_path = token_meta_path(path)
  if not meta_path.exists():
    return None
  try:
    return json.loads(meta_path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f'data.path={str(path)!r}: its sidecar {meta_path} is unreadable ({e}); '
                      're-run blox-tokenize or delete the sidecar and set data.token_dtype') from e


def token_file_dtype(path: str | Path, token_dtype: str) -> str:
  """The dtype of a token file: its sidecar's, checked against `data.token_dtype` ('auto': the sidecar's, else uint16)."""
  meta = read_token_meta(path)
  if meta is None:
    return 'uint16' if token_dtype == 'auto' else token_dtype
  if token_dtype not in ('auto', meta['dtype']):
    raise ConfigError(f"data.token_dtype={token_dtype!r}: {token_meta_path(path)} records dtype {meta['dtype']!r}; "
                      'set data.token_dtype=auto (read it from the sidecar).')
  return meta['dtype']


def read_token_file(path: str, cfg: DataConfig, tokenizer: Tokenizer) -> np.memmap:
  """A token file, memory-mapped with the dtype its sidecar records (else `data.token_dtype`, uint16 for 'auto').

  With a sidecar, the file's tokenizer must be `data.tokenizer` (the same
  files, by sha256) and its length must match the recorded token count.
  """
  dtype = token_file_dtype(path, cfg.token_dtype)
  meta = read_token_meta(path)
  if meta is not None and meta.get('tokenizer_sha256') != tokenizer.fingerprint():
    raise TokenizerError(f"data.tokenizer={cfg.tokenizer!r}: {path} was tokenized with {meta.get('tokenizer')!r} "
                         f'(a different tokenizer, per {token_meta_path(path)}); set data.tokenizer to the tokenizer '
                         'blox-tokenize used, or re-tokenize the text with this one.')
  itemsize = np.dtype(dtype).itemsize
  size = os.path.getsize(path)
  if size == 0 or size % itemsize:
    raise ConfigError(f"data.path={path!r}: {size} bytes is not a whole, non-zero number of {dtype} tokens; "
                      'set data.token_dtype to the dtype the file was written with (or re-run blox-tokenize).')
  if meta is not None and size // itemsize != meta['num_tokens']:
    raise ConfigError(f"data.path={path!r}: holds {size // itemsize} tokens but {token_meta_path(path)} records "
                      f"{meta['num_tokens']}; the file is truncated or was overwritten: re-run blox-tokenize.")
  return np.memmap(path, dtype=np.dtype(dtype), mode='r')


# -- sources --------------------------------------------------------------------------------------


def _stdlib_tokens(cfg: DataConfig, tokenizer: Tokenizer) -> np.ndarray:
  if isinstance(tokenizer, ByteTokenizer):  # the byte stream of earlier runs: every file + a blank line, cut
    return tokenizer.encode_array(stdlib_corpus(cfg.max_bytes))
  return tokenizer.encode_documents(stdlib_documents(cfg.max_bytes))


def _text_tokens(cfg: DataConfig, tokenizer: Tokenizer) -> np.ndarray:
  return tokenizer.encode_documents([Path(p).read_bytes() for p in _expand(cfg.path, 'data.path')])


def _file_tokens(cfg: DataConfig, tokenizer: Tokenizer) -> np.ndarray:
  if cfg.token_dtype not in TOKEN_DTYPES:
    raise ConfigError(f"data.token_dtype={cfg.token_dtype!r}: not a token dtype; use one of {', '.join(TOKEN_DTYPES)}.")
  paths = _expand(cfg.path, 'data.path')
  if len(paths) != 1:
    raise ConfigError(f"data.path={cfg.path!r}: matches {len(paths)} files but data.source='tokens' reads one; concatenate them first.")
  return read_token_file(paths[0], cfg, tokenizer)


def _array_record_tokens(cfg: DataConfig, tokenizer: Tokenizer) -> np.ndarray:
  source = grain.sources.ArrayRecordDataSource(_expand(cfg.path, 'data.path'))
  return tokenizer.encode_documents([bytes(source[i]) for i in range(len(source))])


# data.source: corpus name -> its loader (config, tokenizer) -> 1-d token ids.
SOURCES = {'stdlib': _stdlib_tokens, 'text': _text_tokens, 'tokens': _file_tokens, 'array_record': _array_record_tokens}
# data.token_dtype: 'auto' (from the file's sidecar) or the id widths a 'tokens' file may hold.
TOKEN_DTYPES = ('auto', *TOKEN_FILE_DTYPES)


def load_tokens(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> np.ndarray:
  """The whole corpus as one 1-d array of token ids (uint8/16/32; memory-mapped for 'tokens').

  - 'stdlib': the standard library source (capped at `data.max_bytes`).
  - 'text': UTF-8 files matching `data.path`, sorted, one document each.
  - 'tokens': a raw binary file of uint16/uint32 ids (blox-tokenize, or numpy
    `tofile` with `data.token_dtype`), memory-mapped, so corpora larger than RAM work.
  - 'array_record': ArrayRecord files of UTF-8 documents (one record each),
    tokenized and concatenated in memory.
  Documents are joined as `Tokenizer.encode_documents` does (end-of-document
  tokens between them; a blank line for the byte tokenizer).
  """
  if cfg.source not in SOURCES:
    raise ConfigError(f"data.source={cfg.source!r}: not a data source; use one of {', '.join(SOURCES)}.")
  return SOURCES[cfg.source](cfg, tokenizer or get_tokenizer(cfg.tokenizer))


# data.packing: plain concatenation, or documents kept apart by segment ids.
PACKINGS = ('concat', 'document')


def _byte_document_ends(lengths: list[int], total: int) -> np.ndarray:
  """Stream offsets of the last byte of each document joined by `DOCUMENT_SEPARATOR` (the separator ends its document)."""
  ends = np.cumsum(np.asarray(lengths, np.int64) + len(DOCUMENT_SEPARATOR)) - 1
  return np.minimum(ends, total - 1)


def document_ends(cfg: DataConfig, tokenizer: Tokenizer, tokens: np.ndarray) -> tuple[int | None, np.ndarray | None]:
  """How `data.packing='document'` finds document boundaries: `(eos_id, None)` or `(None, ends)`.

  A tokenizer with an end-of-document token marks them in the stream itself
  (the eos token ends its document). The byte tokenizer has none: the
  boundaries are the corpus's file/record boundaries, returned as the sorted
  stream offsets of each document's last byte (its trailing blank line).
  """
  if tokenizer.eos_id is not None:
    return tokenizer.eos_id, None
  if not isinstance(tokenizer, ByteTokenizer):
    raise ConfigError(f"data.packing='document': data.tokenizer={cfg.tokenizer!r} has no end-of-document token "
                      "(eos) to find documents by; use a tokenizer with one or data.packing='concat'.")
  if cfg.source == 'stdlib':
    lengths = [len(d) for d in stdlib_documents(cfg.max_bytes)]
  elif cfg.source == 'text':
    lengths = [os.path.getsize(p) for p in _expand(cfg.path, 'data.path')]
  elif cfg.source == 'array_record':
    source = grain.sources.ArrayRecordDataSource(_expand(cfg.path, 'data.path'))
    lengths = [len(bytes(source[i])) for i in range(len(source))]
  else:
    raise ConfigError(f"data.packing='document': data.source={cfg.source!r} with data.tokenizer={cfg.tokenizer!r} "
                      'has no end-of-document token to find documents by; use a tokenizer with an eos token '
                      "or data.packing='concat'.")
  return None, _byte_document_ends(lengths, len(tokens))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy in nats of the token frequencies: the loss of the best model with no context."""
  counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------
# Packing: the stream as seq_len+1 windows
# -----------------------------------------------------------------------------


class PackedWindows:
  """Random-access windows of a token stream (a grain data source).

  Window `i` (of this split) holds tokens `[s, s + seq_len + 1)` with
  `s = (start + i) * seq_len`: consecutive windows share one token, so every
  token of the stream is a target exactly once. The last window of the
  stream may be short: it is padded with 0 and its mask is 0 there.

  Document packing (`eos_id`: the token that ends a document, or `doc_ends`:
  sorted stream offsets of each document's last token) adds `segment_ids`
  (1, 2, ... per document within the window; 0 on padding) and `positions`
  (0 at each document's first token in the window), and zeroes the mask of
  the cross-document target (the input that ends a document, whose target
  starts the next one).
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int, start: int = 0, stop: int | None = None,
               *, eos_id: int | None = None, doc_ends: np.ndarray | None = None):
    self.tokens = tokens
    self.eos_id = eos_id
    self.doc_ends = doc_ends
    self.seq_len = seq_len
    self.vocab_size = vocab_size
    total = num_windows(len(tokens), seq_len)
    self.start = start
    self.stop = total if stop is None else stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> Batch:
    """-> {'inputs': int32[T], 'targets': int32[T], 'mask': float32[T]}."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'window {index} out of range [0, {len(self)}).')
    begin = (self.start + index) * self.seq_len
    chunk = np.asarray(self.tokens[begin:begin + self.seq_len + 1], dtype=np.int32)
    if chunk.size and int(chunk.max()) >= self.vocab_size:
      raise ValueError(f'Token id {int(chunk.max())} at stream offset ~{begin} is >= model.vocab_size={self.vocab_size}. '
                       'Check data.token_dtype and model.vocab_size.')
    valid = chunk.size - 1
    window = np.zeros(self.seq_len + 1, np.int32)
    window[:chunk.size] = chunk
    mask = np.zeros(self.seq_len, np.float32)
    mask[:valid] = 1.0
    item = {'inputs': window[:-1], 'targets': window[1:], 'mask': mask}
    if self.eos_id is None and self.doc_ends is None:
      return item
    if self.eos_id is not None:
      ends = chunk[:valid] == self.eos_id
    else:
      offsets = begin + np.arange(valid, dtype=np.int64)
      at = np.minimum(np.searchsorted(self.doc_ends, offsets), len(self.doc_ends) - 1)
      ends = self.doc_ends[at] == offsets
    segments = np.zeros(self.seq_len, np.int32)
    segments[:valid] = 1 + np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int32)
    index = np.arange(self.seq_len, dtype=np.int32)
    starts = np.where(np.concatenate([[True], segments[1:] != segments[:-1]]), index, 0)
    item['segment_ids'] = segments
    item['positions'] = (index - np.maximum.accumulate(starts)).astype(np.int32)
    mask[:valid][ends] = 0.0
    return item


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Windows covering every target of a stream of `num_tokens` (the last may be short)."""
  return max(0, -(-(num_tokens - 1) // seq_len))


def check_corpus(tokens: np.ndarray, cfg: DataConfig, vocab_size: int) -> None:
  """The corpus can make at least one training window and its ids fit the model (ConfigError if not).

  Ids are checked on the first 16M tokens (a memory-mapped corpus of billions is not read at start-up);
  later ones are checked as their windows are read.
  """
  where = 'data.path' if cfg.source != 'stdlib' else 'data.max_bytes'
  total = num_windows(len(tokens), cfg.seq_len)
  n_eval = 0 if cfg.eval_fraction == 0 else max(1, int(round(total * cfg.eval_fraction)))
  if total - n_eval < 1:
    raise ConfigError(f'{where}: the corpus holds {len(tokens)} tokens, too few for one training window of '
                      f'data.seq_len={cfg.seq_len} after holding out data.eval_fraction={cfg.eval_fraction}; '
                      'use a larger corpus, a smaller data.seq_len or data.eval_fraction=0.')
  head = np.asarray(tokens[:1 << 24])
  if head.size and int(head.max()) >= vocab_size:
    raise ConfigError(f'{where}: token id {int(head.max())} is >= model.vocab_size={vocab_size}; '
                      'check data.token_dtype and data.tokenizer, or raise model.vocab_size.')


# -----------------------------------------------------------------------------
# Pipelines
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  """What the trainer needs from the data section.

  `train`: an endless iterator of this process's rows of each global batch
  (`{'inputs': int32[B/P, T], 'targets': int32[B/P, T], 'mask': float32[B/P, T]}`)
  whose `get_state()` is the global data position; `eval_batches()`: the same
  held-out batches every time; `unigram_entropy`: nats, of the training split.
  """
  train: GlobalBatches
  eval_dataset: grain.MapDataset | None
  eval_batch_count: int
  num_train_windows: int
  num_eval_windows: int
  num_tokens: int
  unigram_entropy: float
  local_batch_size: int

  def eval_batches(self) -> Iterator[Batch]:
    if self.eval_dataset is None:
      return iter(())
    return (self.eval_dataset[i] for i in range(self.eval_batch_count))


def _stack(items: list[Batch]) -> Batch:
  return {k: np.stack([x[k] for x in items]) for k in items[0]}


def _row_chunks(batch_size: int, rows: slice | None) -> tuple[int, int, int]:
  """`rows` of each global batch -> (chunk size, first chunk, chunks per global batch)."""
  start, stop = (0, batch_size) if rows is None else (rows.start or 0, rows.stop)
  size = stop - start
  if size < 1 or start < 0 or stop > batch_size or start % size or batch_size % size:
    raise ValueError(f'Process rows [{start}, {stop}) are not an aligned slice of data.batch_size={batch_size}: '
                     'the batch must split evenly over the processes (make data.batch_size divisible by the '
                     'number of batch shards).')
  return size, start // size, batch_size // size


def train_dataset(windows: PackedWindows, batch_size: int, seed: int, rows: slice | None = None) -> grain.MapDataset:
  """Endless shuffled batches of this process's `rows` of global batch `i` (element `i`).

  `.shuffle(seed).repeat()` reshuffles each epoch with seed + epoch (grain).
  Global batch `i` is windows `[i*B, (i+1)*B)` of the shuffled stream;
  batching the stream in chunks of `stop - start` rows and taking every
  `B / (stop - start)`-th chunk from `start / (stop - start)` gives exactly
  rows `[start, stop)` of each global batch without reading the others.
  """
  size, first, per_batch = _row_chunks(batch_size, rows)
  if len(windows) == 0:
    raise ConfigError(f'data.path: the training split is empty (the corpus is shorter than one window of '
                      f'data.seq_len={windows.seq_len} tokens); use a larger corpus, a smaller data.seq_len or a '
                      'smaller data.eval_fraction.')
  ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat()
  ds = ds.batch(size, drop_remainder=True, batch_fn=_stack)
  return ds[first::per_batch]


def eval_dataset(windows: PackedWindows, batch_size: int, rows: slice | None = None) -> grain.MapDataset:
  """Held-out batches in a fixed order (wrapping around when there are few windows)."""
  size, first, per_batch = _row_chunks(batch_size, rows)
  ds = grain.MapDataset.source(windows).repeat().batch(size, drop_remainder=True, batch_fn=_stack)
  return ds[first::per_batch]


def make_iterator(ds: grain.MapDataset, state: dict[str, Any] | None = None,
                  *, worker_count: int = 0, prefetch: int = 4) -> grain.DatasetIterator:
  """A grain iterator reading ahead in background threads (off the step's critical path).

  `state` (from `iterator.get_state()`) resumes at the exact next element of
  `ds` (the trainer resumes by global batch index instead: `GlobalBatches`).
  """
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; a plain script never parsed them
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  iterator = iter(it_ds)
  if state is not None:
    iterator.set_state(state)
  return iterator


# -----------------------------------------------------------------------------
# The global data position (elastic resume)
# -----------------------------------------------------------------------------

# What fixes the stream of global batches (data.<key>): a resumed run must keep these, whatever its process
# count, devices or mesh. The corpus itself is compared by a fingerprint ('corpus'), so data.path may move.
STREAM_KEYS = ('batch_size', 'seq_len', 'shuffle_seed', 'source', 'max_bytes', 'eval_fraction', 'packing')


def corpus_fingerprint(tokens: np.ndarray) -> str:
  """`'<num tokens>:<sha1 of the first and last 1M tokens>'`: cheap even for a memory-mapped corpus of billions."""
  n = 1 << 20
  digest = hashlib.sha1(np.ascontiguousarray(tokens[:n]).tobytes())
  digest.update(np.ascontiguousarray(tokens[-n:]).tobytes())
  return f'{len(tokens)}:{digest.hexdigest()[:16]}'


def stream_identity(cfg: DataConfig, tokens: np.ndarray | None = None) -> dict[str, Any]:
  """`{key: value}` of `STREAM_KEYS` that matter for `cfg` (max_bytes only for 'stdlib'), + the corpus's fingerprint."""
  out = {k: getattr(cfg, k) for k in STREAM_KEYS if k != 'max_bytes' or cfg.source == 'stdlib'}
  if tokens is not None:
    out['corpus'] = corpus_fingerprint(tokens)
  return out


def check_stream(recorded: dict[str, Any], now: dict[str, Any], where: str) -> None:
  """ConfigError (one line: the keys, both values of each, the fix) when `now` changes recorded stream keys.

  recorded/now: `stream_identity`s (keys missing from either are not compared);
  where: the run or checkpoint that recorded them, for the message.
  """
  changed = [(k, old, now[k]) for k, old in recorded.items() if k in now and now[k] != old]
  keys = [(k, old, new) for k, old, new in changed if k != 'corpus']
  if keys:
    was = ', '.join(f'data.{k}={old!r}' for k, old, _ in keys)
    raise ConfigError(f"{', '.join(f'data.{k}={old!r} -> {new!r}' for k, old, new in keys)}: the run in {where} was "
                      f'trained with {was} and a resumed run must see the global batches it would have seen; resume '
                      f'with {was} (processes, devices and the mesh may change), or start fresh with '
                      'checkpoint.resume=false or a new train.workdir')
  if changed:
    (_, old, new), = changed
    raise ConfigError(f'data: the corpus differs from the one the run in {where} was trained on (tokens:sha1 {old} '
                      f'-> {new}), so its global batches would differ; resume with the same corpus and '
                      'data.tokenizer (data.path may move), or start fresh with checkpoint.resume=false or a new '
                      'train.workdir')


def resume_position(state: dict[str, Any] | None) -> int:
  """The next global batch index recorded in a checkpoint's data state (0 for None).

  Reads the current form (`{'global_batch': n, ...}`) and the grain iterator
  states of earlier checkpoints: `{'next_index': n}` (one iterator over the
  process's view, whose element n is global batch n) and the interleave state
  of `data.worker_count > 0` (each worker's iterator counts the batches it
  delivered; their sum is the number consumed).
  """
  if not state:
    return 0
  if 'global_batch' in state:
    return int(state['global_batch'])
  if 'next_index' in state:
    return int(state['next_index'])
  if 'iterators_in_use_states' in state:
    return sum(int(s['next_index']) for s in state['iterators_in_use_states'])
  raise ConfigError(f'the checkpoint holds an unrecognised data iterator state (keys {sorted(state)}); '
                    'start fresh with checkpoint.resume=false or a new train.workdir')


def check_resume_state(state: dict[str, Any] | None, cfg: DataConfig, tokens: np.ndarray, where: str) -> None:
  """ConfigError when `cfg` and the corpus `tokens` would not continue the global batches `state` recorded.

  state: a checkpoint's data state (`GlobalBatches.get_state()`); states of
  earlier checkpoints record no stream: nothing to check.
  """
  if state and 'global_batch' in state:
    recorded = {k: v for k, v in state.items() if k != 'global_batch'}
    check_stream(recorded, stream_identity(cfg, tokens), where)


def row_hashes(batch: Batch) -> list[str]:
  """One short hex digest per row of `batch` (all its arrays): compares the data of two runs cheaply."""
  rows = len(batch['inputs'])
  return [hashlib.sha1(b''.join(np.ascontiguousarray(batch[k][r]).tobytes() for k in sorted(batch))).hexdigest()[:16]
          for r in range(rows)]


HASHES = 'the data hashes'  # what `data.log_hashes` writes, for a failed write's message


class GlobalBatches:
  """This process's rows of global batches `start, start + 1, ...` (an endless iterator).

  `get_state()` -> `{'global_batch': next index, **stream identity}`: the
  position any process count resumes from (`build_data(state=...)`).
  `hash_log`: a JSON-lines file receiving `{'global_batch', 'first_row',
  'rows': row_hashes}` for every batch handed out (`data.log_hashes`).
  """

  def __init__(self, ds: grain.MapDataset, start: int, identity: dict[str, Any], *, first_row: int = 0,
               worker_count: int = 0, hash_log: str | Path | None = None):
    self._iterator = make_iterator(ds[start:], worker_count=worker_count)
    self.next_batch = start
    self.identity = identity
    self.first_row = first_row
    self._log = None
    if hash_log is not None:
      self._log_path = Path(hash_log)
      with writing(self._log_path, HASHES):
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self._log_path, 'a')  # noqa: SIM115  (open for the life of the run)

  def __iter__(self) -> GlobalBatches:
    return self

  def __next__(self) -> Batch:
    batch = next(self._iterator)
    if self._log is not None:
      with writing(self._log_path, HASHES):
        self._log.write(json.dumps({'global_batch': self.next_batch, 'first_row': self.first_row,
                                    'rows': row_hashes(batch)}) + '\n')
        self._log.flush()
    self.next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'global_batch': self.next_batch, **self.identity}


def build_data(cfg: DataConfig, vocab_size: int, *, rows: slice | None = None, eval_batches: int = 4,
               state: dict[str, Any] | None = None, tokens: np.ndarray | None = None,
               tokenizer: Tokenizer | None = None, hash_log: str | Path | None = None) -> Data:
  """Corpus -> train iterator (resumed at `state`) and eval batches.

  vocab_size: `model.vocab_size` (checked against `data.tokenizer`'s).
  rows: the rows of each global batch this process loads
    (`distributed.process_batch_slice`; None = all, a single process).
  state: a checkpoint's data state (`Data.train.get_state()` of any process
    count): the run continues at its global batch.
  tokenizer: `data.tokenizer`, loaded (None: loaded here).
  hash_log: where to append the row hashes of every train batch (None: nowhere).
  """
  if tokens is None:
    tokenizer = tokenizer or get_tokenizer(cfg.tokenizer)
    check_vocab(tokenizer, vocab_size, cfg.tokenizer)
    tokens = load_tokens(cfg, tokenizer)
  total = num_windows(len(tokens), cfg.seq_len)
  if cfg.packing not in PACKINGS:
    raise ConfigError(f"data.packing={cfg.packing!r}: use one of {', '.join(PACKINGS)}.")
  eos_id = doc_ends = None
  if cfg.packing == 'document':
    tokenizer = tokenizer or get_tokenizer(cfg.tokenizer)
    eos_id, doc_ends = document_ends(cfg, tokenizer, tokens)
  if not 0.0 <= cfg.eval_fraction < 1.0:
    raise ConfigError(f'data.eval_fraction={cfg.eval_fraction}: must be in [0, 1); pick a fraction below 1.')
  n_eval = 0 if cfg.eval_fraction == 0 else max(1, int(round(total * cfg.eval_fraction)))
  n_train = total - n_eval
  train_windows = PackedWindows(tokens, cfg.seq_len, vocab_size, 0, n_train, eos_id=eos_id, doc_ends=doc_ends)
  eval_windows = PackedWindows(tokens, cfg.seq_len, vocab_size, n_train, total, eos_id=eos_id, doc_ends=doc_ends)
  train = train_dataset(train_windows, cfg.batch_size, cfg.shuffle_seed, rows)
  evals = eval_dataset(eval_windows, cfg.batch_size, rows) if n_eval else None
  # Entropy of the training split (what the model sees): the bar its loss must beat. At most
  # the first 16M tokens: a memory-mapped corpus of billions must not be read at start-up.
  entropy = unigram_entropy(tokens[:min(len(tokens), n_train * cfg.seq_len + 1, 1 << 24)], vocab_size)
  return Data(
      train=GlobalBatches(train, resume_position(state), stream_identity(cfg, tokens),
                          first_row=0 if rows is None else rows.start or 0, worker_count=cfg.worker_count,
                          hash_log=hash_log),
      eval_dataset=evals,
      eval_batch_count=eval_batches,
      num_train_windows=n_train,
      num_eval_windows=n_eval,
      num_tokens=len(tokens),
      unigram_entropy=entropy,
      local_batch_size=_row_chunks(cfg.batch_size, rows)[0],
  )
