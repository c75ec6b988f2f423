"""KV-cache decoding against re-running the full model, and the samplers' rules."""

import dataclasses
import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blox as bx
from blox_scale.training.config import Config, ModelConfig
from blox_scale.models import DecoderLM
from blox_scale.cli.sample import main, sample_text
from blox_scale.models.generate import generate, left_pad, sample_logits
from helpers import tree_allclose
from lm_helpers import fill_params

# Untied head and a large init so that greedy continuations actually vary
# (a tiny tied model at std 0.02 just repeats its last token).
TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                   max_seq_len=40, init_std=0.5, tie_embeddings=False)
PROMPTS = [[5, 17, 3, 44, 9, 1, 30], [12, 7], [50, 2, 2, 8, 60, 33, 21, 4, 4, 19, 11, 0, 36]]


@functools.lru_cache(maxsize=None)
def _setup(config):
  model = DecoderLM(bx.Graph('lm'), config)
  return model, fill_params(jax.eval_shape(model.init, 0), std=config.init_std)


def _greedy_by_rerunning(model, params, prompts, steps):
  """Argmax decoding with NO cache: the full model on the growing sequences.

  Rows are right-padded to one fixed length so the forward compiles once;
  causality makes the padding invisible to the positions read.
  """
  total = max(len(p) for p in prompts) + steps
  fwd = jax.jit(lambda p, x: model(p, x)[0])
  seqs = [list(p) for p in prompts]
  for _ in range(steps):
    tokens = np.zeros((len(seqs), total), np.int32)
    for b, s in enumerate(seqs):
      tokens[b, :len(s)] = s
    logits = np.asarray(fwd(params, jnp.asarray(tokens)))
    for b, s in enumerate(seqs):
      s.append(int(np.argmax(logits[b, len(s) - 1])))
  return [s[len(p):] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize('config', [
    TINY,
    dataclasses.replace(TINY, scan_layers=False),
    dataclasses.replace(TINY, sliding_window=4, qk_norm=True, num_kv_heads=1),
    dataclasses.replace(TINY, position='learned', norm='layernorm', mlp_activation='gelu', use_bias=True),
], ids=['scanned', 'unrolled', 'window_mqa_qknorm', 'gpt2_learned_positions'])
def test_greedy_cache_decoding_equals_rerunning_full_model(config):
  model, params = _setup(config)
  steps = 12
  got = generate(model, params, PROMPTS, max_new_tokens=steps)
  want = _greedy_by_rerunning(model, params, PROMPTS, steps)
  assert got == want
  assert all(len(set(row)) > 2 for row in got), f'degenerate continuations make this test vacuous: {got}'
  if config == TINY:  # each row alone gives the same tokens as in the padded batch
    assert generate(model, params, [PROMPTS[1]], max_new_tokens=steps) == [got[1]]


def test_prefill_and_step_logits_equal_full_forward():
  model, params = _setup(TINY)
  tokens, pad = left_pad(PROMPTS, 16)
  cache = model.init_cache(3, 20)
  (logits, cache), _ = jax.jit(lambda p, t, c: model.decode(p, t, c, cache_index=0, pad=jnp.asarray(pad)))(
      params, jnp.asarray(tokens), cache)
  nxt = jnp.asarray([[3], [4], [5]], jnp.int32)
  (step_logits, _), _ = jax.jit(lambda p, t, c: model.decode(p, t, c, cache_index=16, pad=jnp.asarray(pad)))(
      params, nxt, cache)
  # Reference: every row alone, right-padded to one length (one compile), no cache.
  rows = np.zeros((3, 17), np.int32)
  for b, prompt in enumerate(PROMPTS):
    rows[b, :len(prompt) + 1] = prompt + [int(nxt[b, 0])]
  full = jax.jit(lambda p, x: model(p, x)[0])(params, jnp.asarray(rows))
  for b, prompt in enumerate(PROMPTS):
    tree_allclose(logits[b, pad[b]:], full[b, :len(prompt)], rtol=1e-4, atol=1e-4)
    tree_allclose(step_logits[b, 0], full[b, len(prompt)], rtol=1e-4, atol=1e-4)


def test_sampling_settings_and_seeds():
  model, params = _setup(TINY)
  greedy = generate(model, params, PROMPTS, max_new_tokens=12)
  assert generate(model, params, PROMPTS, max_new_tokens=12, temperature=1.5, top_k=1) == greedy
  a = generate(model, params, PROMPTS, max_new_tokens=12, temperature=1.0, seed=1)
  assert a == generate(model, params, PROMPTS, max_new_tokens=12, temperature=1.0, seed=1)
  assert a != generate(model, params, PROMPTS, max_new_tokens=12, temperature=1.0, seed=2)
  assert a != greedy


def test_top_k_and_top_p_keep_the_right_tokens():
  probs = jnp.asarray([0.05, 0.4, 0.1, 0.3, 0.15])
  logits = jnp.broadcast_to(jnp.log(probs)[None], (4000, 5))
  draw = lambda **kw: np.asarray(jax.jit(functools.partial(sample_logits, **kw))(logits, jax.random.key(0)))
  assert set(draw(temperature=1.0, top_k=2)) == {1, 3}
  # top_p=0.5: token 1 (mass before 0) and token 3 (mass before 0.4 < 0.5); token 4 has 0.7 before it.
  picked = draw(temperature=1.0, top_p=0.5)
  assert set(picked) == {1, 3}
  np.testing.assert_allclose(np.mean(picked == 1), 0.4 / 0.7, atol=0.03)
  full = draw(temperature=1.0)
  np.testing.assert_allclose(np.bincount(full, minlength=5) / 4000, probs, atol=0.03)
  np.testing.assert_array_equal(draw(temperature=0.0), np.full((4000,), 1))
  np.testing.assert_array_equal(draw(temperature=2.0, top_p=1e-6), np.full((4000,), 1))


def test_generate_errors():
  model, params = _setup(TINY)
  with pytest.raises(ValueError, match='max_seq_len=40'):
    generate(model, params, [[1] * 35], max_new_tokens=10)
  with pytest.raises(ValueError, match='at least one token'):
    generate(model, params, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match=r'in \[0, 61\)'):
    generate(model, params, [[1, 99]], max_new_tokens=2)
  with pytest.raises(ValueError, match='top_p'):
    generate(model, params, [[1]], max_new_tokens=2, top_p=0.0)


def test_cli_prints_prompt_and_continuation(monkeypatch, capsys, tmp_path):
  config = dataclasses.replace(TINY, vocab_size=256)  # the byte tokenizer's vocab
  model, params = _setup(config)
  fake = types.ModuleType('blox_scale.training.checkpoint')
  fake.load_for_inference = lambda path: (Config(model=config), model, params)
  fake.find_workdir = lambda path: (tmp_path, None)  # no recorded tokenizer there: data.tokenizer ('byte')
  monkeypatch.setitem(sys.modules, 'blox_scale.training.checkpoint', fake)
  (tmp_path / 'config.yaml').write_text('{}')  # the CLI checks the path before loading
  assert main(['--checkpoint', str(tmp_path), '--prompt', '(0', '--max-new-tokens', '12', '--temperature', '0']) == 0
  out = capsys.readouterr().out
  [expected] = generate(model, params, [list(b'(0')], max_new_tokens=12)
  assert out == '(0' + bytes(expected).decode('utf-8', errors='replace') + '\n'


def test_padded_vocab_ids_are_never_sampled():
  model, params = _setup(TINY)  # vocab 61; a tokenizer of 40 ids
  free = np.asarray(generate(model, params, PROMPTS, max_new_tokens=20, temperature=1.5))
  limited = np.asarray(generate(model, params, PROMPTS, max_new_tokens=20, temperature=1.5, vocab_limit=40))
  assert free.max() >= 40  # without the limit the padding ids do come up
  assert limited.max() < 40
  with pytest.raises(ValueError, match='vocab_limit=62'):
    generate(model, params, PROMPTS, max_new_tokens=2, vocab_limit=62)


class _IdTokenizer:
  """Token i <-> character chr(65 + i); BOS 0 starts prompts; `eos_id` set by the test."""
  vocab_size, bos_id = 61, 0

  def __init__(self, eos_id):
    self.eos_id = eos_id

  def encode(self, text):
    return [ord(c) - 65 for c in text]

  def encode_prompt(self, text):
    return [self.bos_id] + self.encode(text)

  def decode(self, ids):
    return ''.join(chr(65 + i) for i in ids)


def test_sample_text_starts_with_bos_and_stops_at_end_of_document():
  model, params = _setup(TINY)
  [new] = generate(model, params, [[0, 5, 17]], max_new_tokens=12)
  eos = new[5]
  text = sample_text(model, params, _IdTokenizer(eos), 'FR', max_new_tokens=12)
  assert text == ''.join(chr(65 + i) for i in new[:new.index(eos)])
