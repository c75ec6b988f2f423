"""KV-cache decoding: prefill plus token-by-token generation in one jitted loop.

`generate(model, params, prompts, max_new_tokens=...)` runs, inside ONE
`jax.jit`:
  1. prefill: the whole (left-padded) prompt batch goes through
     `model.decode`, filling cache slots `[0, P)`;
  2. a `jax.lax.fori_loop` that samples a token from the last logits and
     feeds it back, one cache slot per step.
The cache is `{'k', 'v'}: [num_layers, batch, P + max_new_tokens, kv_heads,
head_dim]`, scanned together with the stacked layer params by
`Stack.call_per_layer`: a scanned checkpoint decodes as it is, with no
conversion to per-layer params.

Prompts of different lengths are LEFT-padded to a common length P, so every
row writes the same cache slot at each step (one `dynamic_update_slice` for
the whole batch). Row b's padding occupies slots `[0, pad_b)`; the attention
mask hides them and its positions start at 0 after the pad, so each row
computes exactly what it would alone (checked in tests/test_sample.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import blox as bx

# Prompts are padded up to a multiple of this, so prompts of nearby lengths
# share one compiled program.
PROMPT_BUCKET = 16


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Picks one token per row. `logits: f32[batch, vocab]` -> `int32[batch]`.

  temperature 0 is greedy (argmax; key unused). Otherwise the logits are
  divided by `temperature`, restricted to the `top_k` largest (0 = all) and
  then to the smallest set whose probability reaches `top_p` (nucleus
  sampling, Holtzman et al. 2019; 1.0 = all), and sampled.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / jnp.float32(temperature)
  neg_inf = jnp.float32(-jnp.inf)
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]                          # [B, 1]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)            # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep a token while the mass of the tokens ranked above it is < top_p;
    # the top token is always kept.
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.float32(jnp.inf))
    threshold = jnp.min(kept, axis=-1, keepdims=True)                       # [B, 1]
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=('max_new_tokens', 'temperature', 'top_k', 'top_p', 'vocab_limit'))
def _generate(model: Any, params: bx.Params, tokens: jax.Array, pad: jax.Array, key: jax.Array, *,
              max_new_tokens: int, temperature: float, top_k: int, top_p: float, vocab_limit: int) -> jax.Array:
  """`tokens: int32[B, P]` left-padded, `pad: int32[B]` -> `int32[B, max_new_tokens]`."""
  batch, prompt_len = tokens.shape

  def pick(logits: jax.Array, key: jax.Array) -> jax.Array:  # logits: [B, vocab]
    if vocab_limit < logits.shape[-1]:  # padded vocab: never sample ids the tokenizer cannot decode
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    return sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  (logits, cache), _ = model.decode(params, tokens, cache, cache_index=0, pad=pad)
  first = pick(logits[:, -1], jax.random.fold_in(key, 0))
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

  def step(i, carry):
    out, cache, token = carry
    # Token i-1 goes into slot P + i - 1; its logits give token i.
    (logits, cache), _ = model.decode(params, token[:, None], cache, cache_index=prompt_len + i - 1, pad=pad)
    token = pick(logits[:, 0], jax.random.fold_in(key, i))
    return out.at[:, i].set(token), cache, token

  out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, first))
  return out


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """-> `(tokens: int32[B, length], pad: int32[B])`, each prompt right-aligned."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  pad = np.zeros((len(prompts),), np.int32)
  for b, p in enumerate(prompts):
    pad[b] = length - len(p)
    tokens[b, pad[b]:] = np.asarray(p, np.int32)
  return tokens, pad


def generate(model: Any, params: bx.Params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             vocab_limit: int | None = None) -> list[list[int]]:
  """Continues every prompt by `max_new_tokens` tokens.

  Args:
    model: a `DecoderLM` (anything with `init_cache`, `decode`, `config`).
    params: its params.
    prompts: token id lists, possibly of different lengths (each >= 1 token).
    max_new_tokens: tokens generated per prompt (no early stop: callers cut
      at an end-of-document token, see blox-sample).
    temperature: 0 = greedy; top_k: 0 = no limit; top_p: 1.0 = no limit.
    seed: sampling seed (step i uses `fold_in(key(seed), i)`).
    vocab_limit: sample only ids < vocab_limit (the tokenizer's vocab when
      the model's is padded beyond it); None = the model's vocab.
  Returns:
    The NEW tokens only, one list of `max_new_tokens` ids per prompt.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('generate: every prompt needs at least one token (encode some text first).')
  if max_new_tokens < 1:
    raise ValueError(f'generate: max_new_tokens must be >= 1, got {max_new_tokens}.')
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f'generate: need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got '
                     f'temperature={temperature}, top_p={top_p}, top_k={top_k}.')
  vocab = model.config.vocab_size
  vocab_limit = vocab if vocab_limit is None else int(vocab_limit)
  if not 0 < vocab_limit <= vocab:
    raise ValueError(f'generate: vocab_limit={vocab_limit} must be in [1, model.vocab_size={vocab}].')
  bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab]
  if bad:
    raise ValueError(f'generate: prompt token ids must be in [0, {vocab}), got {bad[:5]}.')
  longest = max(len(p) for p in prompts)
  limit = model.config.max_seq_len
  if longest + max_new_tokens > limit:
    raise ValueError(
        f'generate: longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds '
        f'model.max_seq_len={limit}. Shorten the prompt or generate fewer tokens.')
  length = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, limit - max_new_tokens)
  tokens, pad = left_pad(prompts, length)
  out = _generate(model, params, jnp.asarray(tokens), jnp.asarray(pad), jax.random.key(seed),
                  max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                  top_k=int(top_k), top_p=float(top_p), vocab_limit=vocab_limit)
  return np.asarray(out).tolist()
