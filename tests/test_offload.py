"""Host offload (train.offload): optimizer state and frozen params live in pinned_host between steps.

Against a run without offload: the same losses and params bit for bit (the step
moves the offloaded leaves to device memory and does the same math); the state
after a step really is in host memory; a checkpoint restores into host memory and
the resumed run continues bitwise; a backend without host memory is a one-line
error naming the key.
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import blox as bx
import blox_scale as bs
from blox_scale.parallel import sharding
from blox_scale.training import offload
from blox_scale.training.checkpoint import Checkpointer
from blox_scale.training.config import CheckpointConfig, ConfigError, MeshConfig, load_config
from blox_scale.training.step import TrainState, make_train_step, train_state_shardings

SEQ = 16
RULES = sharding.rules_from_config(MeshConfig())

pytestmark = pytest.mark.skipif(offload.HOST not in offload.memory_kinds(), reason='no pinned_host memory here')


def lora_setup():
  """A 2-layer LoRA model on a frozen base, AdamW, a (data 2, fsdp 2) mesh."""
  cfg = load_config(None, ['model.num_layers=2', 'model.d_model=32', 'model.num_heads=4', 'model.mlp_dim=64',
                           f'model.max_seq_len={SEQ}', f'data.seq_len={SEQ}'])
  model = bs.DecoderLM(bx.Graph('lm'), cfg.model)
  bs.finetune.add_lora(model, ['attn/q', 'mlp/*'], rank=4, alpha=8)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2), jax.devices()[:4])
  return model, optax.adamw(1e-2), mesh


def init_fn(model, optimizer):
  def init():
    params = bs.finetune.freeze_base(model.init(0))
    b_keys = [k for k in params.keys() if k[-1].endswith('lora_b')]  # nonzero B: the base kernels matter for the grads
    params = bx.Params({k: (p.replace(value=p.value + 0.01) if k in b_keys else p) for k, p in params.items()},
                       params.is_locked)
    trainable, _ = params.split()
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=optimizer.init(trainable))
  return init


def batch(step):
  tokens = np.random.default_rng(step).integers(0, 256, (8, SEQ + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((8, SEQ), np.float32)}


def build(parts):
  model, optimizer, mesh = lora_setup()
  init = init_fn(model, optimizer)
  abstract = jax.eval_shape(init)
  shardings = offload.place(train_state_shardings(abstract, mesh, RULES), parts)
  with sharding.use_mesh_rules(mesh, RULES):
    state = jax.jit(init, out_shardings=shardings)()
  step = make_train_step(model, optimizer, mesh, RULES, shardings, sharding.batch_sharding(mesh, RULES))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return state, step, abstract


def kinds(tree):
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def run(state, step, steps):
  losses = []
  for i in steps:
    state, m = step(state, batch(i))
    losses.append(float(m['loss']))
  return state, losses


def assert_same(a, b):
  data = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(data(x)), np.asarray(data(y)))


def test_offloaded_run_equals_the_plain_one_lives_in_host_memory_and_resumes(tmp_path):
  plain, plain_step, _ = build([])
  plain, plain_losses = run(plain, plain_step, range(3))

  state, step, abstract = build(['opt_state', 'frozen'])
  assert kinds(state.opt_state) == {'pinned_host'}
  state, losses = run(state, step, range(2))
  # After steps (donated, rewritten by out_shardings) the offloaded parts are still in host memory.
  trainable, frozen = state.params.split()
  assert kinds(state.opt_state) == kinds(frozen) == {'pinned_host'}
  assert kinds(trainable) == kinds(state.step) == {'device'}
  assert offload.host_bytes(state) == offload.host_bytes(abstract) > 0

  # Save after 2 steps, restore into host memory, take the third step: bitwise the uninterrupted run.
  ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
  ckpt.save(2, state)
  ckpt.wait()
  restored, _ = ckpt.restore(2, abstract)
  ckpt.close()
  r_trainable, r_frozen = restored.params.split()
  assert kinds(restored.opt_state) == kinds(r_frozen) == {'pinned_host'} and kinds(r_trainable) == {'device'}
  assert_same(restored, state)
  resumed, last = run(restored, step, [2])
  assert losses + last == plain_losses
  assert_same(resumed, plain)


def test_a_backend_without_host_memory_is_a_one_line_error(monkeypatch):
  monkeypatch.setattr(offload, 'memory_kinds', lambda device=None: ['device'])
  with pytest.raises(ConfigError, match=r"^train\.offload=\['opt_state'\]: the cpu backend has no 'pinned_host' memory"
                                        r".*set train\.offload=\[\]") as e:
    offload.check_supported(('opt_state',))
  assert '\n' not in str(e.value)
  offload.check_supported(())  # nothing asked for: nothing checked


def test_config_names_the_key():
  assert load_config(None, ['train.offload=[opt_state]']).train.offload == ('opt_state',)
  with pytest.raises(ConfigError, match=r"train\.offload='moments': is not a known name; use one of opt_state, frozen"):
    load_config(None, ['train.offload=[moments]'])
  with pytest.raises(ConfigError, match=r"train\.offload=\['frozen'\]: offloads 'frozen' params, but nothing is frozen"):
    load_config(None, ['train.offload=[frozen]'])


@pytest.mark.slow
def test_blox_train_lora_with_offload_logs_the_same_losses(tmp_path):
  """blox-train end to end: init from a source, steps, eval, samples and a checkpoint with offload on."""
  from blox_scale.cli.train import train
  from blox_scale.training.metrics import read_metrics
  small = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4', 'model.mlp_dim=64', 'model.max_seq_len=32',
           'data.seq_len=32', 'data.batch_size=8', 'data.max_bytes=200000', 'train.plot=false', 'train.progress=false',
           'train.log_every=1', 'train.tensorboard=false', 'train.eval_every=0', 'checkpoint.every=3']
  source = tmp_path / 'source'
  assert train(load_config(None, small + ['train.steps=2', f'train.workdir={source}', 'train.sample_tokens=0'])) == 0
  lora = lambda name, parts: load_config('configs/tiny_lora.yaml', small + [
      f'finetune.init_from={source}', f'train.workdir={tmp_path / name}', 'train.steps=3', 'train.sample_tokens=4',
      f'train.offload=[{",".join(parts)}]'])
  assert train(lora('plain', [])) == 0
  assert train(lora('offload', ['opt_state', 'frozen'])) == 0
  losses = lambda name: [r['loss'] for r in read_metrics(tmp_path / name, 'train')]
  assert losses('offload') == losses('plain') and len(losses('plain')) == 3
  [start] = read_metrics(tmp_path / 'offload', 'start')
  assert start['offload_host_bytes'] == start['opt_state_bytes'] + start['frozen_bytes']


def test_blox_plan_shows_the_host_bytes_and_says_what_xla_counts():
  from blox_scale.cli.plan import PlanRow, format_rows
  rows = [PlanRow('full', 4 << 20, 8 << 20, 1 << 16, 60 << 20, 80 << 20, 1.0, host=10 << 20)]
  table = format_rows(rows)
  assert table.split('\n')[0].split()[:5] == ['remat', 'params', 'opt', 'state', 'host']
  assert table.split('\n')[2].split()[:4] == ['full', '4.00', '8.00', '10.00']
  assert "reports 0 host bytes and counts them in peak" in table
  assert 'host' not in format_rows([dataclasses.replace(rows[0], host=0)])
