"""Tokenizers (byte, Hugging Face tokenizer.json, SentencePiece), blox-tokenize, and one run end to end.

Every tokenizer here is trained by the test itself on a slice of the default
corpus (the stdlib source): no download.
"""

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blox_scale.cli import tokenize as cli_tokenize
from blox_scale.training import data as bd
from blox_scale.training import tokenizer as tk
from blox_scale.training.config import ConfigError, DataConfig, load_config
from helpers import xla_flags

REPO = Path(__file__).resolve().parents[1]
TEXT = 'def f(x):\n  return "héllo ✓"  # ünïcode\n\tpass\n'


def _train_bpe(path, vocab_size=320, special=('<|endoftext|>',), max_bytes=200_000):
  """A byte-level BPE tokenizer (GPT-2 style) trained on the first `max_bytes` of the stdlib corpus."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([d.decode('utf-8', 'replace') for d in bd.stdlib_documents(max_bytes)], trainer)
  tok.save(str(path))
  return path


def _train_sentencepiece(path, vocab_size=400):
  """A tiny SentencePiece BPE model: identity normalisation and byte fallback, so any text round-trips."""
  import sentencepiece as spm
  lines = [l for d in bd.stdlib_documents(60_000) for l in d.decode('utf-8', 'replace').splitlines() if l.strip()]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                 model_type='bpe', byte_fallback=True, character_coverage=1.0,
                                 normalization_rule_name='identity', remove_extra_whitespaces=False, minloglevel=2)
  Path(path).write_bytes(model.getvalue())
  return path


def _wordlevel(path, n):
  """A word-level tokenizer with `n` words 'w0'..'w{n-3}' (+ [UNK], </s>): a vocab beyond uint16 when n > 65536."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  vocab = {'[UNK]': 0, '</s>': 1, **{f'w{i}': i + 2 for i in range(n - 2)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece()  # joins words with spaces
  tok.add_special_tokens(['</s>'])
  tok.save(str(path))
  return path


@pytest.fixture(scope='module')
def bpe_file(tmp_path_factory):
  return _train_bpe(tmp_path_factory.mktemp('bpe') / 'my_tokenizer.json')


@pytest.fixture(scope='module')
def sp_file(tmp_path_factory):
  return _train_sentencepiece(tmp_path_factory.mktemp('sp') / 'sp.model')


# -- kinds ----------------------------------------------------------------------------------------


def test_round_trips_and_special_ids_of_every_kind(bpe_file, sp_file, tmp_path):
  byte = tk.get_tokenizer('byte')
  assert (byte.vocab_size, byte.eos_id, byte.bos_id) == (256, None, None)
  assert byte.decode(byte.encode(TEXT)) == TEXT

  bpe = tk.get_tokenizer(str(bpe_file))
  assert isinstance(bpe, tk.HuggingFaceTokenizer) and bpe.vocab_size == 320
  ids = bpe.encode(TEXT)
  assert bpe.decode(ids) == TEXT and len(ids) < len(TEXT.encode())  # merges learned from the corpus
  assert bpe.eos_id == 0 and bpe.bos_id is None  # '<|endoftext|>' by name, no BOS

  # A directory holding tokenizer.json + tokenizer_config.json (as Hugging Face ships them): the config names bos/eos.
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  _train_bpe(hf_dir / 'tokenizer.json', special=('<unk>', '<s>', '</s>'))
  (hf_dir / 'tokenizer_config.json').write_text(json.dumps({'bos_token': '<s>', 'eos_token': {'content': '</s>'}}))
  hf = tk.get_tokenizer(str(hf_dir))
  assert (hf.bos_id, hf.eos_id) == (1, 2) and hf.prepends_bos
  assert hf.decode(hf.encode(TEXT)) == TEXT and hf.encode_prompt('x') == [1] + hf.encode('x')

  sp = tk.get_tokenizer(str(sp_file))
  assert isinstance(sp, tk.SentencePieceTokenizer) and sp.vocab_size == 400
  assert (sp.bos_id, sp.eos_id) == (1, 2)
  ids = sp.encode(TEXT)
  assert sp.decode(ids) == TEXT and max(ids) < 400

  for tok in (byte, bpe, sp):
    with pytest.raises(ValueError, match=rf'in \[0, {tok.vocab_size}\)'):
      tok.decode([tok.vocab_size])


def test_documents_are_joined_by_end_of_document_tokens(bpe_file, sp_file):
  docs = ['first doc\n', 'second ✓', 'third']
  bpe, sp = tk.get_tokenizer(str(bpe_file)), tk.get_tokenizer(str(sp_file))
  expected = bpe.encode(docs[0]) + [0] + bpe.encode(docs[1]) + [0] + bpe.encode(docs[2])
  np.testing.assert_array_equal(bpe.encode_documents(docs), expected)
  expected = [1] + sp.encode(docs[0]) + [2, 1] + sp.encode(docs[1]) + [2, 1] + sp.encode(docs[2])  # BOS starts each
  stream = sp.encode_documents([d.encode() for d in docs])
  assert stream.dtype == np.uint16
  np.testing.assert_array_equal(stream, expected)
  assert bytes(tk.ByteTokenizer().encode_documents(docs)) == '\n\n'.join(docs).encode()


def test_text_source_uses_the_configured_tokenizer(bpe_file, tmp_path):
  for name, text in (('a.txt', 'alpha\n'), ('b.txt', 'beta ✓\n')):
    (tmp_path / name).write_text(text)
  tokens = bd.load_tokens(DataConfig(source='text', path=str(tmp_path / '*.txt'), tokenizer=str(bpe_file)))
  bpe = tk.get_tokenizer(str(bpe_file))
  np.testing.assert_array_equal(tokens, bpe.encode('alpha\n') + [bpe.eos_id] + bpe.encode('beta ✓\n'))


def test_spec_errors_name_the_key(tmp_path):
  with pytest.raises(tk.TokenizerError, match=r"data.tokenizer='bpe': not a tokenizer kind"):
    tk.get_tokenizer('bpe')
  with pytest.raises(tk.TokenizerError, match='no such file'):
    tk.get_tokenizer(str(tmp_path / 'missing.json'))
  with pytest.raises(tk.TokenizerError, match='holds neither tokenizer.json nor tokenizer.model'):
    tk.get_tokenizer(str(tmp_path))
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(tk.TokenizerError, match="--tokenizer=.*is not a readable Hugging Face tokenizer.json"):
    tk.get_tokenizer(str(tmp_path / 'bad.json'), key='--tokenizer')
  with pytest.raises(ConfigError, match="data.tokenizer='gpt2'"):
    load_config(None, ['data.tokenizer=gpt2'])


def test_vocab_mismatch_is_a_clear_error(bpe_file, tmp_path, capsys):
  bpe = tk.get_tokenizer(str(bpe_file))
  tk.check_vocab(bpe, 320, 'x')
  tk.check_vocab(bpe, 384, 'x')  # a padded model vocab is fine
  with pytest.raises(tk.TokenizerError, match=r"model.vocab_size=300 is smaller than .*data.tokenizer='x' \(320 tokens\)"):
    tk.check_vocab(bpe, 300, 'x')
  with pytest.raises(ConfigError, match='model.vocab_size=100: is smaller than the byte tokenizer'):
    load_config(None, ['model.vocab_size=100'])
  from blox_scale.cli.train import main
  assert main([f'data.tokenizer={bpe_file}', 'model.vocab_size=256', f'train.workdir={tmp_path / "run"}']) == 2
  err = capsys.readouterr().err
  assert 'model.vocab_size=256' in err and 'data.tokenizer=' in err and 'set model.vocab_size=320' in err
  assert not (tmp_path / 'run').exists()  # refused before anything was written


def test_run_records_its_tokenizer(bpe_file, sp_file, tmp_path):
  bpe = tk.get_tokenizer(str(bpe_file))
  tk.record(bpe, tmp_path)
  assert (tmp_path / 'tokenizer' / 'tokenizer.json').read_bytes() == bpe_file.read_bytes()
  recorded = tk.run_tokenizer(tmp_path, 'ignored-when-recorded')
  assert recorded.fingerprint() == bpe.fingerprint() and recorded.encode(TEXT) == bpe.encode(TEXT)
  tk.record(recorded, tmp_path)  # resuming with the recorded copy is the same tokenizer
  with pytest.raises(tk.TokenizerError, match='differs from the tokenizer recorded with this run'):
    tk.check_recorded(tk.get_tokenizer(str(sp_file)), tmp_path)
  with pytest.raises(tk.TokenizerError, match='differs from the tokenizer recorded'):
    tk.check_recorded(tk.ByteTokenizer(), tmp_path)
  assert tk.run_tokenizer(tmp_path / 'fresh', 'byte').kind == 'byte'


# -- blox-tokenize --------------------------------------------------------------------------------


def _corpus_files(directory, count=6, max_bytes=120_000):
  directory.mkdir()
  for i, doc in enumerate(bd.stdlib_documents(max_bytes)[:count]):
    (directory / f'doc{i}.txt').write_bytes(doc)
  return str(directory / '*.txt')


def test_blox_tokenize_is_worker_independent_and_matches_the_pipeline(bpe_file, tmp_path):
  pattern = _corpus_files(tmp_path / 'texts')
  args = ['--tokenizer', str(bpe_file), '--no-progress']
  assert cli_tokenize.main([pattern, '-o', str(tmp_path / 'one'), '--workers', '1', '--chunk-mb', '0.01', *args]) == 0
  assert cli_tokenize.main([pattern, '-o', str(tmp_path / 'two'), '--workers', '2', '--chunk-mb', '0.01', *args]) == 0
  assert (tmp_path / 'one').read_bytes() == (tmp_path / 'two').read_bytes()
  meta = json.loads((tmp_path / 'one.json').read_text())
  assert meta['dtype'] == 'uint16' and meta['num_documents'] == 6 and meta['eos_id'] == 0

  # Without cuts (whole files) the file holds exactly what data.source=text tokenizes in memory.
  assert cli_tokenize.main([pattern, '-o', str(tmp_path / 'whole'), *args]) == 0
  cfg = DataConfig(source='text', path=pattern, tokenizer=str(bpe_file))
  from_text = bd.load_tokens(cfg)
  from_file = bd.load_tokens(dataclasses.replace(cfg, source='tokens', path=str(tmp_path / 'whole')))
  assert from_file.dtype == np.uint16 and from_text.size > 1000
  np.testing.assert_array_equal(from_file, from_text)


def test_token_dtype_is_chosen_from_the_vocab_and_read_back(tmp_path):
  assert [tk.token_dtype(v).name for v in (256, 65536, 65537)] == ['uint16', 'uint16', 'uint32']
  big = _wordlevel(tmp_path / 'big.json', 70_000)
  (tmp_path / 'a.txt').write_text('w69990 w3 w65534 w65535 w65536')
  (tmp_path / 'b.txt').write_text('w12 nope')
  out = tmp_path / 'big.tokens'
  assert cli_tokenize.main([str(tmp_path / '*.txt'), '-o', str(out), '--tokenizer', str(big), '--no-progress']) == 0
  assert json.loads((tmp_path / 'big.tokens.json').read_text())['dtype'] == 'uint32'
  expected = [69992, 5, 65536, 65537, 65538, 1, 14, 0]  # ids = word number + 2; </s> = 1 between; [UNK] = 0
  np.testing.assert_array_equal(np.fromfile(out, np.uint32), expected)
  tokens = bd.load_tokens(DataConfig(source='tokens', path=str(out), tokenizer=str(big)))
  assert tokens.dtype == np.uint32
  np.testing.assert_array_equal(tokens, expected)


def test_token_file_mismatches_are_errors(bpe_file, tmp_path):
  (tmp_path / 'a.txt').write_text('some text for a token file\n' * 20)
  out = tmp_path / 'a.tokens'
  assert cli_tokenize.main([str(tmp_path / 'a.txt'), '-o', str(out), '--tokenizer', str(bpe_file), '--no-progress']) == 0
  cfg = DataConfig(source='tokens', path=str(out), tokenizer=str(bpe_file))
  with pytest.raises(tk.TokenizerError, match="data.tokenizer='byte'.*was tokenized with"):
    bd.load_tokens(dataclasses.replace(cfg, tokenizer='byte'))
  with pytest.raises(ConfigError, match="data.token_dtype='uint32': .* records dtype 'uint16'"):
    bd.load_tokens(dataclasses.replace(cfg, token_dtype='uint32'))
  with open(out, 'ab') as f:
    f.write(b'\0\0')
  with pytest.raises(ConfigError, match='the file is truncated or was overwritten'):
    bd.load_tokens(cfg)
  with open(out, 'ab') as f:
    f.write(b'\0')
  with pytest.raises(ConfigError, match='not a whole, non-zero number of uint16 tokens'):
    bd.load_tokens(cfg)


def test_blox_tokenize_usage_errors(tmp_path, capsys):
  (tmp_path / 'a.txt').write_text('x')
  (tmp_path / 'empty.txt').write_text('')
  cases = [
      ([str(tmp_path / 'nope*.txt'), '-o', str(tmp_path / 'o')], 'nope*.txt: matches no file;'),
      ([str(tmp_path / 'a.txt'), '-o', str(tmp_path / 'o'), '--tokenizer', 'gpt2'], "--tokenizer='gpt2': not a tokenizer kind"),
      ([str(tmp_path / 'a.txt'), '-o', str(tmp_path / 'o'), '--workers', '0'], '--workers=0: must be >= 1;'),
      ([str(tmp_path / 'a.txt'), '-o', str(tmp_path / 'no' / 'o')], 'its directory does not exist;'),
      ([str(tmp_path / 'empty.txt'), '-o', str(tmp_path / 'o')], 'the inputs hold no text'),
  ]
  for argv, message in cases:
    assert cli_tokenize.main([*argv, '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.startswith('blox-tokenize: error: ') and message in err, err
    assert not (tmp_path / 'o').exists() and not (tmp_path / 'o.tmp').exists()


# -- end to end -----------------------------------------------------------------------------------


def _run(*argv, timeout=900):
  proc = subprocess.run([sys.executable, '-m', *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**__import__('os').environ, 'XLA_FLAGS': xla_flags(1)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_trained_tokenizer_end_to_end_tokenize_train_sample(tmp_path):
  tok_dir = tmp_path / 'tok'
  tok_dir.mkdir()
  tok_file = _train_bpe(tok_dir / 'tokenizer.json', vocab_size=384)
  pattern = _corpus_files(tmp_path / 'texts', count=40, max_bytes=300_000)
  _run('blox_scale.cli.tokenize', pattern, '-o', str(tmp_path / 'corpus.tokens'), '--tokenizer', str(tok_file),
       '--workers', '2')
  workdir = tmp_path / 'run'
  out = _run('blox_scale.cli.train', 'data.source=tokens', f'data.path={tmp_path / "corpus.tokens"}',
             f'data.tokenizer={tok_file}', 'model.vocab_size=512',  # padded beyond the tokenizer's 384
             'model.d_model=64', 'model.num_layers=2', 'model.num_heads=2', 'model.mlp_dim=128', 'model.remat=none',
             'model.max_seq_len=64', 'data.seq_len=64', 'data.batch_size=8', 'train.steps=60', 'train.log_every=20',
             'optimizer.warmup_steps=10', 'train.eval_every=0', 'train.progress=false', 'train.plot=false',
             'train.sample_tokens=16', f'train.workdir={workdir}')
  assert 'sample ---' in out
  from blox_scale.training.metrics import read_metrics
  losses = [r['loss'] for r in read_metrics(workdir, 'train')]
  assert losses[-1] < losses[0] - 0.5, losses
  assert (workdir / 'tokenizer' / 'tokenizer.json').read_bytes() == tok_file.read_bytes()

  shutil.rmtree(tok_dir)  # the run is self-contained: blox-sample reads the recorded copy
  prompt = 'def __init__(self'
  sample = _run('blox_scale.cli.sample', '--checkpoint', str(workdir), '--prompt', prompt, '--max-new-tokens', '24',
                '--temperature', '0')
  assert sample.startswith(prompt) and len(sample.strip()) > len(prompt)


# -- blox-sample --hf -----------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_from_a_hugging_face_directory_with_its_own_tokenizer(tmp_path, capsys):
  import blox_scale as bs
  from blox_scale.cli import sample
  from blox_scale.models.generate import generate
  from test_hf import write_llama
  from tokenizers import Tokenizer

  hf_dir = tmp_path / 'hf'
  write_llama(hf_dir, vocab=64)
  _wordlevel(hf_dir / 'tokenizer.json', 40)  # 40 ids: the model's vocab (64) is padded beyond it
  sample.main(['--hf', str(hf_dir), '--prompt', 'w1 w2', '--max-new-tokens', '8', '--temperature', '0'])
  out = capsys.readouterr().out

  # Reference: the model as bs.hf.load gives it, argmax over the tokenizer's 40 ids, cut at '</s>',
  # decoded by the `tokenizers` library directly.
  model, params = bs.hf.load(hf_dir)
  [new] = generate(model, params, [[3, 4]], max_new_tokens=8, vocab_limit=40)
  new = new[:new.index(1)] if 1 in new else new
  assert len(new) >= 2 and max(new) < 40
  assert out == 'w1 w2' + Tokenizer.from_file(str(hf_dir / 'tokenizer.json')).decode(new) + '\n'

  # blox-convert records the tokenizer in the workdir; --checkpoint then samples exactly as --hf did,
  # and blox-to-hf ships it again.
  proc = subprocess.run([sys.executable, '-m', 'blox_scale.cli.convert', 'hf-to-blox', str(hf_dir), str(tmp_path / 'wd'),
                         '--no-progress'], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  sample.main(['--checkpoint', str(tmp_path / 'wd'), '--prompt', 'w1 w2', '--max-new-tokens', '8', '--temperature', '0'])
  assert capsys.readouterr().out == out
  from blox_scale.cli import convert
  assert convert.main(['blox-to-hf', str(tmp_path / 'wd'), str(tmp_path / 'out'), '--no-progress']) == 0
  assert (tmp_path / 'out' / 'tokenizer.json').read_bytes() == (hf_dir / 'tokenizer.json').read_bytes()

  _wordlevel(hf_dir / 'tokenizer.json', 70)
  assert sample.main(['--hf', str(hf_dir), '--prompt', 'w1']) == 2
  assert 'vocab_size of its config.json=64 is smaller than the vocabulary of --hf=' in capsys.readouterr().err
  (hf_dir / 'tokenizer.json').unlink()
  assert sample.main(['--hf', str(hf_dir), '--prompt', 'w1']) == 2
  assert 'holds neither tokenizer.json nor tokenizer.model' in capsys.readouterr().err


@pytest.mark.slow
def test_the_docs_tokenizer_snippet_runs(tmp_path, monkeypatch):
  import re
  [snippet] = re.findall(r'```python\n(.*?)```', (REPO / 'docs' / 'training.md').read_text(), flags=re.S)
  monkeypatch.chdir(tmp_path)
  exec(compile(snippet, 'docs/training.md', 'exec'), {})
  tok = tk.get_tokenizer('runs/tok/tokenizer.json')
  assert tok.vocab_size == 1024 and tok.eos_id == 0 and tok.decode(tok.encode(TEXT)) == TEXT
