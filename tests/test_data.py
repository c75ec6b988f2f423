"""Data pipeline: corpora, packing, shuffling, per-process rows, exact resume."""

import dataclasses
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from blox_scale.training import data as bd
from blox_scale.training.config import ConfigError, DataConfig
from blox_scale.training.tokenizer import ByteTokenizer, get_tokenizer


def _cfg(**kw):
  return dataclasses.replace(DataConfig(), **kw)


# -- tokenizer ------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = 'def f(x):\n  return "héllo ✓"\n'
  ids = tok.encode(text)
  assert ids == list(text.encode('utf-8'))
  assert tok.decode(ids) == text
  assert tok.encode_array(text).dtype == np.uint8
  assert tok.decode([0xff, ord('a')]) == '\ufffda'  # invalid UTF-8 never raises
  with pytest.raises(ValueError, match=r'\[0, 256\)'):
    tok.decode([300])
  with pytest.raises(ValueError, match="data.tokenizer='bpe'"):
    get_tokenizer('bpe')


# -- corpora --------------------------------------------------------------------


def test_stdlib_corpus_is_deterministic_capped_and_local():
  files = bd.stdlib_files()
  root = Path(sysconfig.get_paths()['stdlib'])
  rel = [f.relative_to(root).as_posix() for f in files]
  assert rel == sorted(rel) and len(rel) > 100
  assert not any('site-packages' in r or 'dist-packages' in r for r in rel)
  a = bd.stdlib_corpus(50_000)
  assert len(a) == 50_000 and a == bd.stdlib_corpus(50_000)
  # The corpus starts with the first file, whole, then the separator.
  first = files[0].read_bytes()
  assert a.startswith(first[:1000])


def test_text_tokens_and_array_record_sources(tmp_path):
  (tmp_path / 'a.txt').write_text('alpha\n')
  (tmp_path / 'b.txt').write_text('beta ✓\n')
  tokens = bd.load_tokens(_cfg(source='text', path=str(tmp_path / '*.txt')))
  assert bytes(tokens) == b'alpha\n' + bd.DOCUMENT_SEPARATOR + 'beta ✓\n'.encode()

  for dtype in ('uint16', 'uint32'):
    ids = np.arange(1000, dtype=dtype) % 300
    ids.tofile(tmp_path / f'ids.{dtype}')
    loaded = bd.load_tokens(_cfg(source='tokens', path=str(tmp_path / f'ids.{dtype}'), token_dtype=dtype))
    assert isinstance(loaded, np.memmap) and loaded.dtype == dtype
    np.testing.assert_array_equal(loaded, ids)

  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / 'docs.array_record'), 'group_size:1')
  for doc in (b'first doc', b'second'):
    writer.write(doc)
  writer.close()
  tokens = bd.load_tokens(_cfg(source='array_record', path=str(tmp_path / 'docs.array_record')))
  assert bytes(tokens) == b'first doc' + bd.DOCUMENT_SEPARATOR + b'second'

  with pytest.raises(ConfigError, match='matches no file'):
    bd.load_tokens(_cfg(source='text', path=str(tmp_path / 'nope*.txt')))


def test_unigram_entropy_matches_hand_formula():
  tokens = np.array([0, 0, 1, 2, 2, 2, 2, 3], np.uint8)
  p = np.array([2, 1, 4, 1]) / 8
  assert bd.unigram_entropy(tokens, 256) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)


# -- packing --------------------------------------------------------------------


def test_packed_windows_cover_every_target_once():
  tokens = np.arange(1, 38, dtype=np.uint16)  # 37 tokens, seq 8 -> 4 full windows + one of 4 targets
  w = bd.PackedWindows(tokens, 8, 256)
  assert len(w) == bd.num_windows(37, 8) == math.ceil(36 / 8) == 5
  for i in range(4):
    np.testing.assert_array_equal(w[i]['inputs'], tokens[8 * i:8 * i + 8])
    np.testing.assert_array_equal(w[i]['targets'], tokens[8 * i + 1:8 * i + 9])
    assert w[i]['mask'].sum() == 8
  last = w[4]
  np.testing.assert_array_equal(last['mask'], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(last['targets'][:4], tokens[33:37])
  targets = np.concatenate([w[i]['targets'][w[i]['mask'] > 0] for i in range(len(w))])
  np.testing.assert_array_equal(targets, tokens[1:])
  assert w[0]['inputs'].dtype == np.int32 and w[0]['mask'].dtype == np.float32
  with pytest.raises(ValueError, match='vocab_size=20'):
    bd.PackedWindows(tokens, 8, 20)[2]


def test_eval_split_is_held_out():
  tokens = np.arange(2001, dtype=np.uint32)  # token == its offset: windows are identifiable
  d = bd.build_data(_cfg(seq_len=16, batch_size=4, eval_fraction=0.1), 1 << 20, tokens=tokens, eval_batches=2)
  total = bd.num_windows(2001, 16)
  assert d.num_eval_windows == round(0.1 * total) and d.num_train_windows + d.num_eval_windows == total
  eval_start = d.num_train_windows * 16
  train_starts = set()
  for _ in range(2 * d.num_train_windows // 4):  # two epochs
    train_starts.update(int(x) for x in next(d.train)['inputs'][:, 0])
  assert train_starts == set(range(0, eval_start, 16))  # every train window, no eval window
  evals = list(d.eval_batches())
  assert len(evals) == 2
  np.testing.assert_array_equal(evals[0]['inputs'][:, 0], eval_start + 16 * np.arange(4))
  np.testing.assert_array_equal(list(d.eval_batches())[1]['inputs'], evals[1]['inputs'])  # same every time


# -- shuffling, process rows, resume ------------------------------------------------


def _first_column(ds, n):
  return np.stack([ds[i]['inputs'][:, 0] for i in range(n)])


def test_shuffle_is_a_deterministic_permutation_per_epoch():
  tokens = np.arange(4 * 64 + 1, dtype=np.uint32)
  windows = bd.PackedWindows(tokens, 4, 1 << 20)  # 64 windows; window i starts at token 4i
  a = _first_column(bd.train_dataset(windows, 8, seed=3), 16)  # two epochs of 8 batches
  b = _first_column(bd.train_dataset(windows, 8, seed=3), 16)
  c = _first_column(bd.train_dataset(windows, 8, seed=4), 16)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for epoch in (a[:8], a[8:]):
    assert sorted(epoch.ravel().tolist()) == list(range(0, 256, 4))  # every window exactly once
  assert not np.array_equal(a[:8], a[8:])  # reshuffled each epoch


@pytest.mark.parametrize('processes', [2, 4])
def test_process_rows_partition_the_global_batch(processes):
  tokens = np.arange(4 * 64 + 1, dtype=np.uint32)
  windows = bd.PackedWindows(tokens, 4, 1 << 20)
  whole = bd.train_dataset(windows, 8, seed=0)
  per = 8 // processes
  parts = [bd.train_dataset(windows, 8, seed=0, rows=slice(p * per, (p + 1) * per)) for p in range(processes)]
  for i in range(10):
    joined = {k: np.concatenate([ds[i][k] for ds in parts]) for k in ('inputs', 'targets', 'mask')}
    for k, v in whole[i].items():
      np.testing.assert_array_equal(joined[k], v)
  with pytest.raises(ValueError, match='data.batch_size=8'):
    bd.train_dataset(windows, 8, seed=0, rows=slice(1, 4))


def test_iterator_state_resumes_at_the_exact_next_batch():
  cfg = _cfg(seq_len=16, batch_size=4, max_bytes=40_000)
  tokens = bd.load_tokens(cfg)
  d = bd.build_data(cfg, 256, tokens=tokens)
  for _ in range(7):
    next(d.train)
  state = d.train.get_state()
  expected = [next(d.train) for _ in range(5)]
  resumed = bd.build_data(cfg, 256, tokens=tokens, state=state)
  for want in expected:
    got = next(resumed.train)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # A fresh iterator starts at batch 0, which differs.
  assert not np.array_equal(next(bd.build_data(cfg, 256, tokens=tokens).train)['inputs'], expected[0]['inputs'])


def test_data_position_is_global_so_any_process_count_resumes_it():
  """Elastic resume: the state one process of two saved continues on 1 and on 4 processes."""
  cfg = _cfg(seq_len=8, batch_size=8, max_bytes=20_000)
  tokens = bd.load_tokens(cfg)
  whole = bd.build_data(cfg, 256, tokens=tokens)  # the reference: global batches 0, 1, ... in one process
  want = [next(whole.train) for _ in range(6)]
  half = bd.build_data(cfg, 256, tokens=tokens, rows=slice(4, 8))  # process 1 of 2
  for _ in range(3):
    next(half.train)
  state = half.train.get_state()
  assert state['global_batch'] == 3 and state['batch_size'] == 8 and state['shuffle_seed'] == 0
  for processes in (1, 4):
    per = 8 // processes
    parts = [bd.build_data(cfg, 256, tokens=tokens, state=state, rows=slice(p * per, (p + 1) * per)).train
             for p in range(processes)]
    for reference in want[3:]:
      got = [next(it) for it in parts]
      for k, v in reference.items():
        np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), v)
  # Earlier checkpoints held grain's own iterator states: one iterator, or the interleave of 2 workers.
  assert bd.resume_position({'next_index': 5}) == 5
  assert bd.resume_position({'next_index_in_cycle': 1, 'iterators_in_use_states': [{'next_index': 2},
                                                                                   {'next_index': 1}]}) == 3
  assert bd.resume_position(None) == 0


def test_a_resume_that_changes_the_global_batches_is_refused():
  cfg = _cfg(seq_len=8, batch_size=8, max_bytes=20_000)
  tokens = bd.load_tokens(cfg)
  state = {'global_batch': 3, **bd.stream_identity(cfg, tokens)}
  bd.check_resume_state(state, dataclasses.replace(cfg, worker_count=2), tokens, 'w/checkpoints/3')  # may change
  bd.check_resume_state({'next_index': 3}, dataclasses.replace(cfg, batch_size=4), tokens, 'w')  # records nothing
  for key, value in (('batch_size', 4), ('seq_len', 16), ('shuffle_seed', 1), ('packing', 'document')):
    with pytest.raises(ConfigError) as e:
      bd.check_resume_state(state, dataclasses.replace(cfg, **{key: value}), tokens, 'w/checkpoints/3')
    old = getattr(cfg, key)
    assert str(e.value) == (f'data.{key}={old!r} -> {value!r}: the run in w/checkpoints/3 was trained with '
                            f'data.{key}={old!r} and a resumed run must see the global batches it would have seen; '
                            f'resume with data.{key}={old!r} (processes, devices and the mesh may change), or start '
                            'fresh with checkpoint.resume=false or a new train.workdir')
  with pytest.raises(ConfigError, match=r"^data.seq_len=8 -> 16, data.packing='concat' -> 'document': .* trained "
                     r"with data.seq_len=8, data.packing='concat' and .*; resume with data.seq_len=8, "
                     r"data.packing='concat' \(processes"):
    bd.check_resume_state(state, dataclasses.replace(cfg, seq_len=16, packing='document'), tokens, 'w')
  with pytest.raises(ConfigError, match=r'^data: the corpus differs from the one the run in w was trained on '
                     r'\(tokens:sha1 20000:\w+ -> 20000:\w+\).*data.path may move'):
    bd.check_resume_state(state, cfg, tokens[::-1], 'w')
