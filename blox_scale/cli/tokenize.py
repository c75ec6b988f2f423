"""blox-tokenize: text files -> one memory-mapped token file for `data.source=tokens`.

    blox-tokenize --tokenizer tok/tokenizer.json --output corpus.tokens 'texts/**/*.txt' --workers 4
    blox-train data.source=tokens data.path=corpus.tokens data.tokenizer=tok/tokenizer.json

Each input file is one document, in the order given (each glob sorted); documents
are joined as the data pipeline joins them (`Tokenizer.encode_documents`: an
end-of-document token between documents, BOS at each start where the tokenizer
has one). The ids are written as uint16 when the vocab fits, else uint32, and
`<output>.json` records the dtype, the token count and the tokenizer's sha256,
which `data.source=tokens` checks.

Files larger than `--chunk-mb` are cut at line ends into pieces tokenized
separately (bounded memory, parallel work within a file); the pieces depend only
on the file and `--chunk-mb`, never on `--workers`, so the output is the same
for any worker count.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from blox_scale.cli.common import ArgumentParser, UsageError, run_cli

_SCAN = 1 << 16  # bytes read at a time when looking for a line end


class Piece(NamedTuple):
  """Bytes `[start, stop)` of document `doc`'s file; `first`: the document's first piece."""
  path: str
  start: int
  stop: int
  doc: int
  first: bool


def expand_inputs(patterns: Sequence[str]) -> list[str]:
  """Files matching each pattern (sorted per pattern, in argument order, duplicates dropped)."""
  files: dict[str, None] = {}
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
      raise UsageError(f'{pattern}: matches no file; check the path (quote a glob so the shell leaves it alone)')
    for path in matches:
      if os.path.isfile(path):
        files.setdefault(path, None)
  if not files:
    raise UsageError(f'{" ".join(patterns)}: matches only directories; give files or a glob such as DIR/*.txt')
  return list(files)


def _line_end_after(f, offset: int, size: int) -> int:
  """The offset just past the first b'\\n' at or after `offset` (the file size if none)."""
  f.seek(offset)
  while offset < size:
    block = f.read(_SCAN)
    if not block:
      break
    newline = block.find(b'\n')
    if newline >= 0:
      return offset + newline + 1
    offset += len(block)
  return size


def split_pieces(files: Sequence[str], chunk_bytes: int) -> list[Piece]:
  """Every file as pieces of about `chunk_bytes`, cut just after a line end."""
  pieces = []
  for doc, path in enumerate(files):
    size = os.path.getsize(path)
    start = 0
    with open(path, 'rb') as f:
      while True:
        stop = size if size - start <= chunk_bytes else _line_end_after(f, start + chunk_bytes, size)
        pieces.append(Piece(path, start, stop, doc, start == 0))
        if stop >= size:
          break
        start = stop
  return pieces


# -- workers: one tokenizer each, loaded once ------------------------------------------------------

_tokenizer = None


def _init_worker(spec: str) -> None:
  global _tokenizer
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')  # one thread per worker: --workers sets the parallelism
  from blox_scale.training.tokenizer import get_tokenizer
  _tokenizer = get_tokenizer(spec, key='--tokenizer')


def _encode_piece(piece: Piece) -> np.ndarray:
  """The ids of one piece as `token_dtype(vocab)[n]` (no separators: the writer adds them)."""
  from blox_scale.training.tokenizer import ByteTokenizer, token_dtype
  with open(piece.path, 'rb') as f:
    f.seek(piece.start)
    raw = f.read(piece.stop - piece.start)
  dtype = token_dtype(_tokenizer.vocab_size)
  if isinstance(_tokenizer, ByteTokenizer):  # bytes kept exactly, as data.source=text does
    return np.frombuffer(raw, np.uint8).astype(dtype)
  return np.asarray(_tokenizer.encode(raw.decode('utf-8', errors='replace')), dtype)


def tokenize_files(files: Sequence[str], spec: str, output: str | Path, *, workers: int = 1,
                   chunk_bytes: int = 16 << 20, progress: bool = True) -> dict:
  """Writes the token file `output` and its sidecar `<output>.json`; returns the sidecar's dict.

  The file is written as `<output>.tmp` and renamed when complete: a failed
  run leaves no partial output.
  """
  from tqdm import tqdm

  from blox_scale.training.data import token_meta_path, write_token_meta
  from blox_scale.training.tokenizer import get_tokenizer, token_dtype

  tokenizer = get_tokenizer(spec, key='--tokenizer')
  dtype = token_dtype(tokenizer.vocab_size)
  head = np.asarray([tokenizer.bos_id] if tokenizer.prepends_bos else [], dtype)
  separator = np.asarray(tokenizer.separator(), dtype)
  pieces = split_pieces(files, chunk_bytes)
  output = Path(output)
  tmp = output.with_name(output.name + '.tmp')
  num_tokens = 0
  bar = tqdm(total=sum(p.stop - p.start for p in pieces), unit='B', unit_scale=True, desc='blox-tokenize',
             disable=not progress, file=sys.stderr, mininterval=1.0)
  pool = None
  try:
    if workers > 1 and len(pieces) > 1:
      pool = multiprocessing.get_context('spawn').Pool(min(workers, len(pieces)), _init_worker, (spec,))
      results = pool.imap(_encode_piece, pieces)  # in order: the output does not depend on scheduling
    else:
      _init_worker(spec)
      results = map(_encode_piece, pieces)
    with open(tmp, 'wb') as out:
      for piece, ids in zip(pieces, results):
        parts = ([separator] if piece.first and piece.doc > 0 else []) + ([head] if piece.first else []) + [ids]
        for part in parts:
          part.tofile(out)
          num_tokens += part.size
        bar.update(piece.stop - piece.start)
    if num_tokens == 0:
      raise UsageError(f'{files[0]}: the inputs hold no text (0 tokens); give non-empty files')
    token_meta_path(output).unlink(missing_ok=True)  # a stale sidecar must never describe the new file
    tmp.replace(output)
  finally:
    bar.close()
    if pool is not None:
      pool.terminate()
    tmp.unlink(missing_ok=True)
  meta = {
      'format': 'blox-tokens', 'version': 1, 'dtype': dtype.name, 'num_tokens': num_tokens,
      'num_documents': len(files), 'vocab_size': tokenizer.vocab_size, 'eos_id': tokenizer.eos_id,
      'bos_id': tokenizer.bos_id if tokenizer.prepends_bos else None, 'tokenizer': spec,
      'tokenizer_sha256': tokenizer.fingerprint(),
  }
  write_token_meta(output, meta)
  return meta


def _main(argv: list[str]) -> int:
  parser = ArgumentParser(
      prog='blox-tokenize', description='Pre-tokenize text files into one token file for data.source=tokens.',
      epilog='Then: blox-train data.source=tokens data.path=OUTPUT data.tokenizer=SPEC')
  parser.add_argument('inputs', nargs='+', help='Text files or globs (UTF-8); each file is one document.')
  parser.add_argument('--output', '-o', required=True, help='The token file to write (plus OUTPUT.json).')
  parser.add_argument('--tokenizer', default='byte',
                      help="'byte', a Hugging Face tokenizer.json (or its directory) or a SentencePiece .model.")
  parser.add_argument('--workers', type=int, default=1, help='Worker processes (the output is the same for any count).')
  parser.add_argument('--chunk-mb', type=float, default=16.0, help='Files larger than this are tokenized in pieces cut at line ends.')
  parser.add_argument('--no-progress', action='store_true', help='No progress bar.')
  parser.add_argument('--debug', action='store_true', help='Print the traceback of an error (also BLOX_DEBUG=1).')
  args = parser.parse_args(argv)
  if args.workers < 1:
    raise UsageError(f'--workers={args.workers}: must be >= 1; pass --workers 1 or more')
  if not args.chunk_mb > 0:
    raise UsageError(f'--chunk-mb={args.chunk_mb}: must be > 0; pass e.g. --chunk-mb 16')
  if not Path(args.output).absolute().parent.is_dir():
    raise UsageError(f'--output={args.output}: its directory does not exist; create it first')
  files = expand_inputs(args.inputs)
  meta = tokenize_files(files, args.tokenizer, args.output, workers=args.workers,
                        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))), progress=not args.no_progress)
  print(f"wrote {args.output}: {meta['num_tokens']:,} {meta['dtype']} tokens from {meta['num_documents']:,} "
        f"file(s), vocab {meta['vocab_size']:,} (+ {args.output}.json)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`blox-tokenize [--tokenizer SPEC] --output FILE INPUT [INPUT ...]`; returns the exit status.

  Errors are one line, `blox-tokenize: error: <path or option>: <what>; <fix>`:
  exit 2 for bad arguments (and tokenizers), 1 for a failed read or write.
  """
  return run_cli('blox-tokenize', _main, argv)


if __name__ == '__main__':
  raise SystemExit(main())
