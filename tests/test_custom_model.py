"""model.factory: a whole model that is not a DecoderLM (tests/custom_model_pkg.py, a masked-LM
MLP-mixer) through the protocol, blox-train, resume, blox-plan, blox-sample and blox-convert."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blox_scale.models import Decoder, DecoderLM, Model, ModelConfig, build_model
from blox_scale.models.protocol import DecodeNotSupported, check_can_decode
from blox_scale.training.config import ConfigError, load_config
from blox_scale.training.metrics import read_metrics
from helpers import run_tool
from lm_helpers import fill_params

TESTS = Path(__file__).resolve().parent
MIXER = 'custom_model_pkg:masked_mixer'


@pytest.mark.parametrize('overrides, message', [
    (['model.factory=custom_model_pkg'], "model.factory='custom_model_pkg': not of the form 'pkg.module:factory'"),
    (['model.factory=no_such_pkg_xyz:fn'], "model.factory='no_such_pkg_xyz:fn': cannot import 'no_such_pkg_xyz'"),
    (['model.factory=broken_block_pkg:fn'], "model.factory='broken_block_pkg:fn': importing broken_block_pkg failed: "
                                            'RuntimeError: this module is broken on purpose'),
    (['model.factory=custom_model_pkg:missing'], "model.factory='custom_model_pkg:missing': custom_model_pkg has no 'missing'"),
    (['model.factory=custom_model_pkg:not_a_model'], "model.factory='custom_model_pkg:not_a_model': returned a Linear, "
                                                     'which has no config, init, loss; return an object with config, init(seed)'),
    ([f'model.factory={MIXER}', 'model.factory_args.rate=1'], "model.factory_args: unknown option(s) ['rate']"),
    ([f'model.factory={MIXER}', 'model.block=custom_block_pkg:parallel_block'],
     "model.block='custom_block_pkg:parallel_block': cannot be combined with model.factory="),
    ([f'model.factory={MIXER}', 'model.block_args.mask_rate=0.5'], 'model.block_args='),
    (['model.factory_args.mask_rate=0.5'], "model.factory_args={'mask_rate': 0.5}: is set but model.factory is empty"),
])
def test_a_bad_factory_is_one_config_error_naming_the_key(overrides, message):
  with pytest.raises(ConfigError) as info:
    load_config(None, overrides, files=False)
  text = str(info.value)
  assert text.startswith(message) and '\n' not in text, text


def test_decoder_lm_and_the_factory_model_share_the_protocol():
  decoder = build_model(ModelConfig(d_model=32, num_layers=1, num_heads=2, mlp_dim=64))
  mixer = build_model(ModelConfig(d_model=32, num_layers=2, mlp_dim=64, max_seq_len=16, factory=MIXER,
                                  factory_args={'mask_rate': 0.5}))
  assert isinstance(decoder, DecoderLM) and isinstance(decoder, Model) and isinstance(decoder, Decoder)
  assert isinstance(mixer, Model) and not isinstance(mixer, Decoder) and mixer.mask_rate == 0.5
  check_can_decode(decoder)
  with pytest.raises(DecodeNotSupported, match=f"^model.factory='{MIXER}': MaskedMixerLM has no init_cache/decode"):
    check_can_decode(mixer)
  # The model is what the factory built under the 'lm' root, its Stack's params stacked per layer.
  params = fill_params(jax.eval_shape(mixer.init, 0))
  assert params[('lm', 'layers', 'block', 'token_mix', 'kernel')].value.shape == (2, 16, 16)
  # Bidirectional: changing the last token changes the first position's logits (a causal model's would not).
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (1, 16)), jnp.int32)
  first = lambda t: mixer.logits(params, t)[0][0, 0]
  assert not np.allclose(first(tokens), first(tokens.at[0, -1].set(7)))


# -- the command-line tools ------------------------------------------------------------------------

TINY = [f'model.factory={MIXER}', 'model.factory_args.mask_rate=0.5', 'model.d_model=32', 'model.num_layers=2',
        'model.mlp_dim=64', 'model.max_seq_len=32', 'data.seq_len=32', 'data.batch_size=8', 'data.max_bytes=200000',
        'optimizer.learning_rate=1e-2', 'optimizer.warmup_steps=1', 'optimizer.schedule=constant',
        'train.progress=false', 'train.plot=false', 'train.eval_every=0', 'train.log_every=1', 'checkpoint.every=6']


@pytest.mark.slow
def test_a_factory_model_trains_resumes_exactly_plans_and_refuses_to_sample(tmp_path):
  tool = lambda *args, check=True: run_tool(*args, cwd=TESTS, check=check)
  whole, parts = tmp_path / 'whole', tmp_path / 'parts'
  out = tool('train', *TINY, 'train.steps=12', 'train.sample_tokens=8', f'train.workdir={whole}').stdout
  assert f"samples skipped: model.factory='{MIXER}': MaskedMixerLM has no init_cache/decode" in out
  losses = lambda w: {r['step']: r['loss'] for r in read_metrics(w, 'train')}
  curve = [losses(whole)[s] for s in range(1, 13)]
  assert np.mean(curve[-3:]) < np.mean(curve[:3]) - 0.5, curve  # it learns (masked-token loss falls)

  tool('train', *TINY, 'train.steps=6', 'train.sample_tokens=0', f'train.workdir={parts}')
  out = tool('train', *TINY, 'train.steps=12', 'train.sample_tokens=0', f'train.workdir={parts}').stdout
  assert 'resumed from' in out
  assert losses(parts) == losses(whole)  # bitwise: params, optimizer state, the Rng counter and the data order
  assert f'factory: {MIXER}' in (parts / 'config.yaml').read_text()

  # Every tool rebuilds the model from the factory recorded in config.yaml.
  plan = tool('plan', '--config', str(parts / 'config.yaml'), '--devices', '2', '--remat', 'none,full').stdout
  rows = {line.split()[0]: line.split() for line in plan.splitlines() if line.startswith(('none ', 'full '))}
  assert set(rows) == {'none', 'full'} and 'n/a' not in plan, plan
  assert float(rows['full'][4]) < float(rows['none'][4])  # the model's Stack follows model.remat: less temp memory
  for args, prefix in [(('sample', '--checkpoint', str(parts), '--prompt', 'x'),
                        f"blox-sample: error: model.factory='{MIXER}': MaskedMixerLM has no init_cache/decode"),
                       (('convert', 'blox-to-hf', str(parts), str(tmp_path / 'hf')),
                        f"blox-convert: error: model.factory='{MIXER}': ")]:
    proc = tool(*args, check=False)
    assert proc.returncode != 0 and proc.stderr.startswith(prefix), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'hf').exists()
