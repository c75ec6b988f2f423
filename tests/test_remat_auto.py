"""remat='auto': the least recomputation whose compiled train step fits the budget.

One tiny DecoderLM train step is compiled once per candidate (shared by the
tests); the budgets are set from XLA's own figures for those compilations.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import blox as bx
from blox_scale.models import DecoderLM
from blox_scale.training import remat_auto
from blox_scale.training.config import ConfigError, ModelConfig, load_config

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=2, mlp_dim=64, max_seq_len=64)
BATCH = {'inputs': jax.ShapeDtypeStruct((8, 64), jnp.int32), 'targets': jax.ShapeDtypeStruct((8, 64), jnp.int32),
         'mask': jax.ShapeDtypeStruct((8, 64), jnp.float32)}


def lower(name):
  model = DecoderLM(bx.Graph('lm'), remat_auto.candidate_config(CFG, name))
  trainable, rest = jax.eval_shape(model.init).split()

  def grads(trainable, rest, batch):
    return jax.grad(lambda t: model.loss(t.merge(rest), batch)[0])(trainable)

  return jax.jit(grads).lower(trainable, rest, BATCH)


class _Compiled:
  def __init__(self, compiled):
    self.compiled = compiled

  def compile(self):
    return self.compiled


@pytest.fixture(scope='module')
def compiled():
  return {name: _Compiled(lower(name).compile()) for name in remat_auto.CANDIDATES}


@pytest.fixture(scope='module')
def peaks(compiled):
  return {name: remat_auto.peak_bytes(c.compiled.memory_analysis()) for name, c in compiled.items()}


def test_the_candidates_differ_in_memory(peaks):
  # What the other tests rely on: keeping residuals costs memory, recomputing saves it.
  assert peaks['none'] > peaks['dots'] > peaks['full']
  assert peaks['save_names'] > peaks['full']


def test_ample_budget_picks_none_after_one_compile(compiled, peaks):
  log = []
  choice = remat_auto.choose_remat(compiled.__getitem__, 2**40, log=log.append)
  assert choice.remat == 'none'
  assert [m.remat for m in choice.measured] == ['none']
  assert choice.measured[0].peak_bytes == peaks['none']
  assert choice.record()['remat_auto_choice'] == 'none' and len(log) == 1


def test_tight_budget_picks_full_or_nested(compiled, peaks):
  budget = min(peaks['full'], peaks['nested'])
  choice = remat_auto.choose_remat(compiled.__getitem__, budget)
  assert choice.remat in ('full', 'nested')
  # Every candidate before it (less recomputation) was measured and did not fit.
  before = remat_auto.CANDIDATES[:remat_auto.CANDIDATES.index(choice.remat)]
  assert [m.remat for m in choice.measured[:-1]] == list(before)
  assert all(m.peak_bytes > budget for m in choice.measured[:-1])
  assert choice.measured[-1].peak_bytes <= budget
  assert choice.compiled is compiled[choice.remat].compiled
  assert 'remat=auto chose' in choice.summary()


def test_nothing_fits_names_the_smallest_peak(compiled, peaks):
  smallest = min(peaks, key=peaks.get)
  with pytest.raises(remat_auto.RematBudgetError, match=rf"smallest peak is '{smallest}' at .* \({peaks[smallest]} bytes\)"):
    remat_auto.choose_remat(compiled.__getitem__, peaks[smallest] - 1)


def test_a_candidate_that_does_not_compile_is_skipped(compiled):
  def lower_or_fail(name):
    if name == 'none':
      raise ValueError('no host memory here')
    return compiled[name]
  choice = remat_auto.choose_remat(lower_or_fail, 2**40)
  assert choice.remat == 'dots'
  assert choice.measured[0].error == 'ValueError: no host memory here'


def test_candidate_configs_and_budget():
  assert remat_auto.candidate_config(CFG, 'nested').remat == 'full'
  assert remat_auto.candidate_config(CFG, 'nested').remat_nested
  assert remat_auto.candidate_config(CFG, 'save_names').remat_names == remat_auto.BLOCK_NAMES
  named = dataclasses.replace(CFG, remat_names=('mlp_out',))
  assert remat_auto.candidate_config(named, 'save_names').remat_names == ('mlp_out',)
  assert remat_auto.budget_bytes(1.5) == int(1.5 * 2**30)
  assert remat_auto.budget_bytes(0) > 0  # CPU: the host's memory shared by its devices
  with pytest.raises(ValueError, match='model.remat_budget_gib=-1'):
    remat_auto.budget_bytes(-1)
  with pytest.raises(ValueError, match="model.remat='auto' is resolved by the trainer"):
    DecoderLM(bx.Graph('lm'), dataclasses.replace(CFG, remat='auto'))


def test_config_accepts_auto_and_jax_names():
  assert load_config(None, ['model.remat=auto', 'model.remat_budget_gib=2']).model.remat == 'auto'
  assert load_config(None, ['model.remat=dots_with_no_batch_dims_saveable']).model.remat == 'dots_with_no_batch_dims_saveable'
  with pytest.raises(ConfigError, match=r"model.remat='everything': is not a known name; use one of none, full"):
    load_config(None, ['model.remat=everything'])


def test_trainer_records_the_choice_in_metrics(tmp_path, capsys):
  from blox_scale.cli.train import train
  from blox_scale.training.metrics import read_metrics
  overrides = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=2', 'model.mlp_dim=64',
               'model.max_seq_len=32', 'data.seq_len=32', 'data.batch_size=8', 'data.max_bytes=200000',
               'train.steps=2', 'train.log_every=1', 'train.progress=false', 'train.plot=false',
               'train.sample_tokens=0', 'train.eval_every=0', 'checkpoint.every=0',
               'model.remat=auto', 'model.remat_budget_gib=1024', f'train.workdir={tmp_path}']
  assert train(load_config(None, overrides)) == 0
  start = read_metrics(tmp_path, 'start')[0]
  assert start['remat_auto_choice'] == 'none'  # an ample budget: no recomputation
  assert start['remat_auto_budget_bytes'] == 1024 * 2**30
  # The recorded peak is XLA's analysis of the very step that ran.
  peak = (start['step_argument_bytes'] + start['step_output_bytes'] - start['step_alias_bytes']
          + start['step_temp_bytes'])
  assert start['remat_auto_none_peak_bytes'] == peak
  assert "remat=auto chose 'none'" in capsys.readouterr().out
  assert len(read_metrics(tmp_path, 'train')) == 2
