"""model.block: a user's block (tests/custom_block_pkg.py) in DecoderLM, blox-train, resume and blox-sample."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blox_scale.models import ModelConfig, build_model
from blox_scale.models.generate import generate
from blox_scale.models.plugin import DecodeNotSupported
from blox_scale.training.config import ConfigError, load_config
from blox_scale.training.metrics import read_metrics
from helpers import run_tool, tree_allclose
from lm_helpers import fill_params

TESTS = Path(__file__).resolve().parent
PARALLEL = 'custom_block_pkg:parallel_block'
SMALL = ModelConfig(vocab_size=61, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    max_seq_len=32, tie_embeddings=False, remat='none', block=PARALLEL)


@pytest.mark.parametrize('spec, message', [
    ('custom_block_pkg', "not of the form 'pkg.module:factory'"),
    ('no_such_pkg_xyz:factory', "cannot import 'no_such_pkg_xyz'"),
    ('custom_block_pkg:missing', "custom_block_pkg has no 'missing'; its callables are: "),
    ('custom_block_pkg:NOT_CALLABLE', 'NOT_CALLABLE is a int, not a function'),
    ('custom_block_pkg:two_args', 'cannot be called as factory(graph, model_config, rng)'),
    ('broken_block_pkg:factory', 'importing broken_block_pkg failed: RuntimeError: this module is broken on purpose'),
])
def test_a_bad_block_path_is_one_config_error_naming_the_key(spec, message):
  with pytest.raises(ConfigError) as info:
    load_config(None, [f'model.block={spec}'], files=False)
  text = str(info.value)
  assert text.startswith(f'model.block={spec!r}: ') and message in text, text
  assert '\n' not in text


def test_block_args_are_checked_by_the_factory_at_config_load():
  with pytest.raises(ConfigError, match=r"model.block_args: parallel_block takes no options, got \['width'\]"):
    load_config(None, [f'model.block={PARALLEL}', 'model.block_args.width=3'], files=False)


def test_the_custom_block_is_stacked_and_scan_equals_the_loop():
  model = build_model(SMALL)
  abstract = jax.eval_shape(model.init, 0)
  # The user's params live under the Stack with a leading layer axis.
  assert abstract[('lm', 'layers', 'block', 'attn', 'q')].value.shape[0] == SMALL.num_layers
  params = fill_params(abstract)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 12)), jnp.int32)
  loop = build_model(dataclasses.replace(SMALL, scan_layers=False))

  trainable, rest = params.split()

  def loss(m, t):
    logits, _ = m(t.merge(rest), tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  (l1, g1), (l2, g2) = (jax.value_and_grad(lambda t, m=m: loss(m, t))(trainable) for m in (model, loop))
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  tree_allclose(g1, g2, rtol=1e-4, atol=1e-6)


def test_the_custom_block_decodes_like_its_full_forward():
  model = build_model(SMALL)
  params = fill_params(jax.eval_shape(model.init, 0), std=0.5)
  prompt = [5, 17, 3, 44, 9]
  [new] = generate(model, params, [prompt], max_new_tokens=6, temperature=0.0)
  seq = list(prompt)
  for _ in range(6):  # greedy by re-running the whole sequence: no cache involved
    logits, _ = model(params, jnp.asarray([seq], jnp.int32))
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert list(new) == seq[len(prompt):]


def test_a_block_without_a_cache_trains_but_refuses_to_decode():
  model = build_model(dataclasses.replace(SMALL, block='custom_block_pkg:no_cache_block'))
  params = fill_params(jax.eval_shape(model.init, 0))
  logits, _ = model(params, jnp.zeros((1, 4), jnp.int32))
  assert logits.shape == (1, 4, 61)
  assert not model.can_decode and build_model(SMALL).can_decode
  with pytest.raises(DecodeNotSupported, match="model.block='custom_block_pkg:no_cache_block': its block takes no KV cache"):
    generate(model, params, [[1, 2]], max_new_tokens=2)


# -- the command-line tools ------------------------------------------------------------------------

TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=2', 'model.mlp_dim=64', 'model.remat=none',
        'model.max_seq_len=32', 'data.seq_len=32', 'data.batch_size=4', 'data.max_bytes=200000',
        'train.progress=false', 'train.plot=false', 'train.eval_every=0', 'train.log_every=1']


def _tool(tool, *args, check=True):
  return run_tool(tool, *args, cwd=TESTS, check=check)


@pytest.mark.slow
def test_blox_train_resumes_a_custom_block_exactly_and_samples(tmp_path):
  block = f'model.block={PARALLEL}'
  whole, parts = tmp_path / 'whole', tmp_path / 'parts'
  _tool('train', *TINY, block, 'train.steps=6', 'checkpoint.every=3', 'train.sample_tokens=0', f'train.workdir={whole}')
  _tool('train', *TINY, block, 'train.steps=3', 'checkpoint.every=3', 'train.sample_tokens=0', f'train.workdir={parts}')
  out = _tool('train', *TINY, block, 'train.steps=6', 'checkpoint.every=3', 'train.sample_tokens=8',
              f'train.workdir={parts}').stdout
  assert 'resumed from' in out and 'sample ---' in out
  losses = lambda w: {r['step']: r['loss'] for r in read_metrics(w, 'train')}
  assert losses(parts) == losses(whole)  # bitwise: the same block, params, optimizer state and data order
  assert f'block: {PARALLEL}' in (parts / 'config.yaml').read_text()
  sample = _tool('sample', '--checkpoint', str(parts), '--prompt', 'def ', '--max-new-tokens', '8')
  assert sample.stdout.startswith('def ')


@pytest.mark.slow
def test_blox_sample_says_in_one_line_that_a_cacheless_block_cannot_decode(tmp_path):
  out = _tool('train', *TINY, 'model.block=custom_block_pkg:no_cache_block', 'train.steps=2', 'checkpoint.every=2',
              'train.sample_tokens=8', f'train.workdir={tmp_path}').stdout
  assert "samples skipped: model.block='custom_block_pkg:no_cache_block': its block takes no KV cache" in out
  proc = _tool('sample', '--checkpoint', str(tmp_path), '--prompt', 'x', check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith("blox-sample: error: model.block='custom_block_pkg:no_cache_block': its block "
                                        'takes no KV cache'), proc.stderr
  assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2
