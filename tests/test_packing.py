"""Document packing: segment ids / positions from the data, block-causal attention, per-document loss."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import blox as bx
from blox_scale.models import DecoderLM
from blox_scale.nn import segment_mask
from blox_scale.training.config import DataConfig, ModelConfig
from blox_scale.training.data import PackedWindows, build_data, load_tokens, stdlib_documents
from blox_scale.training.tokenizer import DOCUMENT_SEPARATOR, ByteTokenizer
from helpers import tree_allclose
from lm_helpers import fill_params

ROPE = ModelConfig(vocab_size=31, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=24,
                   max_seq_len=16, init_std=0.1)
LEARNED = dataclasses.replace(ROPE, position='learned', norm='layernorm', mlp_activation='gelu', use_bias=True,
                              tie_embeddings=False, num_kv_heads=0)
DOCS = [3, 5, 4]  # document lengths packed into one row of 12


@functools.lru_cache(maxsize=None)
def _init(config):
  return fill_params(jax.eval_shape(DecoderLM(bx.Graph('lm'), config).init, 0), std=0.1)


def _packed(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 31, (1, sum(DOCS)), dtype=np.int32)
  targets = rng.integers(0, 31, (1, sum(DOCS)), dtype=np.int32)
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(DOCS)])[None].astype(np.int32)
  positions = np.concatenate([np.arange(n) for n in DOCS])[None].astype(np.int32)
  return tokens, targets, segments, positions


def test_segment_mask_is_same_document():
  seg = np.array([[1, 1, 2, 2, 2, 0]])
  want = np.array([[[[seg[0, i] == seg[0, j] for j in range(6)] for i in range(6)]]])
  np.testing.assert_array_equal(segment_mask(jnp.asarray(seg)), want)


def test_packed_logits_and_grads_equal_each_document_alone():
  for config in (ROPE, LEARNED):
    model = DecoderLM(bx.Graph('lm'), config)
    params = _init(config)
    tokens, targets, segments, positions = _packed()
    logits, _ = model(params, jnp.asarray(tokens), segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions))
    start = 0
    for n in DOCS:  # reference: each document run on its own, unpacked, positions 0..n-1
      alone, _ = model(params, jnp.asarray(tokens[:, start:start + n]))
      np.testing.assert_allclose(logits[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
      start += n
    # Without segments the packed row differs (later documents see earlier ones): the mask is what matters.
    plain, _ = model(params, jnp.asarray(tokens))
    assert not np.allclose(plain[:, DOCS[0]:], logits[:, DOCS[0]:], atol=1e-4)
    if config is LEARNED:
      continue  # the gradient check runs once (RoPE), to keep the test cheap

    trainable, frozen = params.split()
    mask = np.ones_like(tokens, np.float32)
    batch = {'inputs': tokens, 'targets': targets, 'mask': mask, 'segment_ids': segments, 'positions': positions}
    loss_fn = lambda t, b: model.loss(t.merge(frozen), b, is_training=False)[0]
    loss, grads = jax.value_and_grad(loss_fn)(trainable, jax.tree.map(jnp.asarray, batch))

    def reference(t):  # token-weighted mean of the per-document losses, each computed alone
      total, start = 0.0, 0
      for n in DOCS:
        doc = {'inputs': tokens[:, start:start + n], 'targets': targets[:, start:start + n],
               'mask': mask[:, start:start + n]}
        total = total + n * loss_fn(t, jax.tree.map(jnp.asarray, doc))
        start += n
      return total / sum(DOCS)

    ref_loss, ref_grads = jax.value_and_grad(reference)(trainable)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    tree_allclose(grads, ref_grads, rtol=1e-4, atol=1e-6)


def _hand_windows(stream, ends, seq_len):
  """Reference: per window, loop over tokens: new segment after a document end; drop the end's target."""
  out = []
  for begin in range(0, len(stream) - 1, seq_len):
    chunk = stream[begin:begin + seq_len + 1]
    seg, pos, mask, s, p = [], [], [], 1, 0
    for t in range(len(chunk) - 1):
      seg.append(s), pos.append(p), mask.append(0.0 if ends[begin + t] else 1.0)
      s, p = (s + 1, 0) if ends[begin + t] else (s, p + 1)
    pad = seq_len - len(seg)
    out.append((seg + [0] * pad, pos + list(range(pad)) if pad else pos, mask + [0.0] * pad))
  return out


def test_windows_restart_positions_and_drop_cross_document_targets():
  eos = 0
  stream = np.array([5, 6, 0, 7, 8, 9, 0, 4, 0, 3, 3, 2, 1, 0, 6, 7, 5], np.int32)
  ends = stream == eos
  windows = PackedWindows(stream, 5, 10, eos_id=eos)
  doc_windows = PackedWindows(stream, 5, 10, doc_ends=np.flatnonzero(ends))
  for i, (seg, pos, mask) in enumerate(_hand_windows(stream, ends, 5)):
    for w in (windows, doc_windows):
      item = w[i]
      valid = int((np.asarray(seg) > 0).sum())
      np.testing.assert_array_equal(item['segment_ids'], seg)
      np.testing.assert_array_equal(item['positions'][:valid], pos[:valid])
      np.testing.assert_array_equal(item['mask'], mask)
  assert windows[0]['positions'].tolist() == [0, 1, 2, 0, 1]


def test_byte_corpus_segments_follow_file_boundaries():
  cfg = DataConfig(max_bytes=6000, seq_len=64, batch_size=2, eval_fraction=0.0, packing='document')
  data = build_data(cfg, 256, tokenizer=ByteTokenizer())
  docs = stdlib_documents(cfg.max_bytes)
  lengths = [len(d) + len(DOCUMENT_SEPARATOR) for d in docs]
  assert len(docs) > 1
  batch = next(data.train)
  assert set(batch) == {'inputs', 'targets', 'mask', 'segment_ids', 'positions'}
  # Shuffled windows: check the unshuffled source against the hand loop over file boundaries.
  stream = load_tokens(cfg, ByteTokenizer())
  ends = np.zeros(len(stream), bool)
  ends[np.minimum(np.cumsum(lengths) - 1, len(stream) - 1)] = True
  source = PackedWindows(stream, 64, 256, doc_ends=np.flatnonzero(ends))
  for i, (seg, pos, mask) in enumerate(_hand_windows(stream, ends, 64)):
    np.testing.assert_array_equal(source[i]['segment_ids'], seg)
    np.testing.assert_array_equal(source[i]['mask'], mask)
