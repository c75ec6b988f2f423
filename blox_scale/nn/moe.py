"""Mixture-of-experts MLP: a linear router, top-k routing, SwiGLU (or GELU) experts.

    logits = x @ router                       f32[tokens, E]
    (w, e) = top_k routing of logits          w: f32[tokens, k], e: int[tokens, k]
    y      = sum_j w_j * expert_{e_j}(x)

Two dispatch paths compute the same `y` (docs/moe.md):
  dropless: the N*k (token, expert) pairs sorted by expert, every expert's rows
            in one grouped matmul (`jax.lax.ragged_dot`), unsorted, weighted.
            No token is ever dropped; shapes are static (N*k rows). With a sharded
            batch each device sorts its own rows (`shard_map`), and the expert
            weights are gathered to them.
  capacity: each sequence gives every expert `C = ceil(capacity_factor * T * k / E)`
            slots; one-hot dispatch/combine einsums move tokens to `[E, batch, C, d]`
            and back (GShard, Switch). Pairs beyond an expert's C slots are dropped
            (their contribution is 0; the residual carries the token on).

Params (logical axes):
  router/kernel        [embed, E]           ('embed', None)       float32 logits
  wi_gate, wi_up       [E, embed, mlp]      ('expert', 'embed', 'mlp')   (gated activations)
  wi                   [E, embed, mlp]      ('expert', 'embed', 'mlp')   (gelu)
  wo                   [E, mlp, embed]      ('expert', 'mlp', 'embed')
An expert kernel may be stored as int8 with `<name>_scale: f32[E, out]` beside it (a frozen
fine-tuning base, `bs.finetune.quantize`); `MoE` dequantizes it per call.
The 'expert' axis maps to the mesh's expert axis (parallel/sharding.py): expert
parallelism. In the capacity path tokens reach their experts by sharding
constraints (XLA inserts the all-to-alls), not by hand-written collectives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

import blox as bx
from blox.layers import cast
from blox_scale.nn.config import MLPConfig, MoEConfig
from blox_scale.nn.mlp import ACTIVATIONS, GATED
from jax.sharding import PartitionSpec

from blox_scale.parallel.sharding import constrain, current_mesh_rules, logical_to_spec

DISPATCH = ('dropless', 'capacity')
ROUTING = ('topk_softmax', 'softmax_topk')

# The auxiliary values `MoE` returns, f32 scalars.
STATS = ('aux_loss', 'z_loss', 'dropped_frac')


def route(logits: jax.Array, top_k: int, routing: str) -> tuple[jax.Array, jax.Array]:
  """`logits: f32[N, E]` -> `(weights: f32[N, k], experts: int32[N, k])`, largest first.

  topk_softmax: softmax over the k largest logits (Mixtral; equals softmax
    over all, top k, renormalised to sum 1).
  softmax_topk: softmax over all E, keep the k largest probabilities as they
    are (Switch, DeepSeek, Qwen-MoE; they sum to < 1).
  """
  if routing == 'topk_softmax':
    top, experts = jax.lax.top_k(logits, top_k)
    return jax.nn.softmax(top, axis=-1), experts
  if routing == 'softmax_topk':
    return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
  raise ValueError(f'MoE: routing={routing!r} is not one of {ROUTING} (model.moe.routing).')


def load_balancing_loss(logits: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
  """Switch / Mixtral load balancing: `E * sum_e f_e * p_e`, f32[] (1.0 when perfectly balanced).

  `f_e`: fraction of the N*k (token, expert) assignments that go to expert e
  (not differentiable); `p_e`: mean router probability of e over the N tokens
  (carries the gradient). `logits: f32[N, E]`, `experts: int[N, k]`.
  """
  counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(0, 1))   # [E]
  f = counts / experts.size
  p = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)                                  # [E]
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: `mean(logsumexp(logits, -1) ** 2)`, f32[]; keeps router logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def capacity(config: MoEConfig, seq_len: int) -> int:
  """Slots per expert per sequence of `seq_len` tokens (dispatch='capacity')."""
  return max(1, math.ceil(config.capacity_factor * seq_len * config.top_k / config.num_experts))


class MoE(bx.Module):
  """`(y, stats), params = moe(params, x)`: `x: [batch, seq, d_model]` -> `y` of the same shape.

  `stats`: f32 scalars 'aux_loss' (load balancing, `load_balancing_loss`),
  'z_loss' (`router_z_loss`) and 'dropped_frac' (the fraction of the N*k
  assignments dropped by capacity; 0 for dropless). They are unweighted:
  the block or model scales them (model.moe.aux_loss_weight, z_loss_weight).

  config: routing and dispatch (`MoEConfig`); mlp: the expert shape, init and
  dtypes (`MLPConfig`: d_model, activation, init_std, out_init_std,
  param_dtype, dtype); each expert's hidden width is `config.mlp_dim or
  mlp.mlp_dim`. The router runs in float32 whatever the compute dtype: its
  softmax and top-k decide where tokens go, and bf16 logits tie often.
  """

  def __init__(self, graph: bx.Graph, config: MoEConfig, mlp: MLPConfig, rng: bx.Rng | None = None) -> None:
    super().__init__(graph)
    where = bx.path_to_str(graph.path)
    if config.num_experts < 1 or not 1 <= config.top_k <= config.num_experts:
      raise ValueError(f'MoE {where}: need num_experts >= 1 and 1 <= top_k <= num_experts, got '
                       f'num_experts={config.num_experts}, top_k={config.top_k} (model.moe.*).')
    if config.dispatch not in DISPATCH:
      raise ValueError(f'MoE {where}: dispatch={config.dispatch!r} is not one of {DISPATCH} (model.moe.dispatch).')
    if config.routing not in ROUTING:
      raise ValueError(f'MoE {where}: routing={config.routing!r} is not one of {ROUTING} (model.moe.routing).')
    if mlp.activation not in ACTIVATIONS:
      raise ValueError(f'MoE {where}: activation={mlp.activation!r} is not one of {sorted(ACTIVATIONS)}.')
    self.config = config
    self.mlp = mlp
    self.rng = rng
    self.hidden = config.mlp_dim or mlp.mlp_dim
    self.names = ('wi_gate', 'wi_up') if mlp.activation in GATED else ('wi',)

  # -- params --------------------------------------------------------------------

  def _weights(self, params: bx.Params) -> tuple[dict[str, jax.Array], bx.Params]:
    c, m = self.config, self.mlp
    E, d, f = c.num_experts, m.d_model, self.hidden
    out_std = m.init_std if m.out_init_std is None else m.out_init_std
    w = {}
    w['router'], params = self.get_param(
        params, 'router', (d, E), jax.nn.initializers.normal(m.init_std), dtype=jnp.float32,
        metadata={'sharding': ('embed', None)}, rng=self.rng)
    for name in (*self.names, 'wo'):
      quantized = self._int8(params, name)
      if quantized is not None:
        w[name] = quantized
        continue
      shape, std, axes = ((E, f, d), out_std, ('expert', 'mlp', 'embed')) if name == 'wo' else \
          ((E, d, f), m.init_std, ('expert', 'embed', 'mlp'))
      w[name], params = self.get_param(params, name, shape, jax.nn.initializers.normal(std), dtype=m.param_dtype,
                                       metadata={'sharding': axes}, rng=self.rng)
    return w, params

  def _int8(self, params: bx.Params, name: str) -> jax.Array | None:
    """An int8 expert kernel (a frozen fine-tuning base) dequantized, or None when it is stored as floats.

    `name: int8[E, in, out]` with `name_scale: f32[E, out]` (one scale per expert and output
    channel, `bs.finetune.quantize`) -> `q * scale` in `param_dtype`, computed per call (inside
    a stack's scan: one layer at a time), for either dispatch path.
    """
    stored = params.get(self.param_path(name))
    if stored is None or stored.dtype != jnp.int8:
      return None
    scale = params[self.param_path(name + '_scale')].value
    w = stored.value.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, :]
    return w.astype(self.mlp.param_dtype)

  def _dtype(self, x: jax.Array, w: dict[str, jax.Array]) -> jnp.dtype:
    return jnp.result_type(x, w['wo']) if self.mlp.dtype is None else jnp.dtype(self.mlp.dtype)

  def _hidden(self, up: dict[str, jax.Array]) -> jax.Array:
    act = ACTIVATIONS[self.mlp.activation]
    h = act(up['wi_gate']) * up['wi_up'] if 'wi_gate' in up else act(up['wi'])
    return checkpoint_name(h, 'mlp_hidden')

  # -- call ----------------------------------------------------------------------

  def __call__(self, params: bx.Params, x: jax.Array) -> tuple[tuple[jax.Array, dict[str, jax.Array]], bx.Params]:
    if x.ndim != 3 or x.shape[-1] != self.mlp.d_model:
      raise ValueError(f'MoE {bx.path_to_str(self.graph.path)}: expected x: [batch, seq, {self.mlp.d_model}], got {x.shape}.')
    c = self.config
    w, params = self._weights(params)
    dt = self._dtype(x, w)
    x = cast(x, dt)
    logits = jnp.einsum('btd,de->bte', x.astype(jnp.float32), w['router'])          # f32[B, T, E]
    weights, experts = route(logits, c.top_k, c.routing)                             # [B, T, k]
    if c.dispatch == 'dropless':
      y = self._dropless(w, x, weights, experts, dt)
      dropped = jnp.zeros((), jnp.float32)
    else:
      y, dropped = self._capacity(w, x, weights, experts, dt)
    flat_logits = logits.reshape(-1, c.num_experts)
    stats = {'aux_loss': load_balancing_loss(flat_logits, experts.reshape(-1, c.top_k), c.num_experts),
             'z_loss': router_z_loss(flat_logits), 'dropped_frac': dropped}
    return (checkpoint_name(y, 'mlp_out'), stats), params

  def _dropless(self, w: dict[str, jax.Array], x: jax.Array, weights: jax.Array, experts: jax.Array,
                dt: jnp.dtype) -> jax.Array:
    """`_dropless_rows` on each batch shard (under `shard_map` when the batch is sharded).

    A global sort of a sharded batch makes XLA gather every routed token onto
    every device; sorting each device's own rows instead keeps tokens where
    they are and gathers one layer's expert weights (as FSDP does).
    """
    ws = {n: cast(w[n], dt) for n in (*self.names, 'wo')}
    current = current_mesh_rules()
    rows = None if current is None else logical_to_spec(('batch',), current[1])[0]
    axes = () if rows is None else (rows,) if isinstance(rows, str) else tuple(rows)
    shards = math.prod(current[0].shape[a] for a in axes) if axes else 1
    if shards == 1 or x.shape[0] % shards:  # one shard, or a batch that does not split (the 1-row init)
      return self._dropless_rows(ws, x, weights, experts)
    spec = PartitionSpec(rows)
    run = jax.shard_map(self._dropless_rows, mesh=current[0], in_specs=(PartitionSpec(), spec, spec, spec),
                        out_specs=spec)
    return run(ws, x, weights, experts)

  def _dropless_rows(self, ws: dict[str, jax.Array], x: jax.Array, weights: jax.Array,
                     experts: jax.Array) -> jax.Array:
    """Sort the N*k assignments by expert, one `ragged_dot` per projection, unsort, weight."""
    dt = x.dtype
    B, T, d = x.shape
    k, E = self.config.top_k, self.config.num_experts
    tokens = x.reshape(B * T, d)
    flat = experts.reshape(-1)                                                       # [N*k], token-major
    order = jnp.argsort(flat, stable=True)                                           # [N*k] by expert
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)                     # [E]
    rows = tokens[order // k]                                                        # [N*k, d], sorted
    up = {n: jax.lax.ragged_dot(rows, ws[n], group_sizes) for n in self.names}      # [N*k, f]
    out = jax.lax.ragged_dot(self._hidden(up), ws['wo'], group_sizes)               # [N*k, d]
    out = out[jnp.argsort(order)].reshape(B, T, k, d)                                # back to token-major
    y = jnp.einsum('btkd,btk->btd', out.astype(jnp.float32), weights)
    return y.astype(dt)

  def _capacity(self, w: dict[str, jax.Array], x: jax.Array, weights: jax.Array, experts: jax.Array,
                dt: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """GShard dispatch per sequence: `[B, T, E, C]` one-hot masks, einsums to `[E, B, C, d]` and back.

    Slots are given in priority order: every token's first choice before any
    second choice, earlier tokens first within a choice (Switch, GShard).
    """
    B, T, d = x.shape
    k, E = self.config.top_k, self.config.num_experts
    C = capacity(self.config, T)
    onehot = jax.nn.one_hot(experts, E, dtype=jnp.int32)                            # [B, T, k, E]
    by_choice = onehot.transpose(0, 2, 1, 3).reshape(B, k * T, E)                    # choice-major
    slot = jnp.sum((jnp.cumsum(by_choice, axis=1) - 1) * by_choice, axis=-1)         # [B, k*T]
    slot = slot.reshape(B, k, T).transpose(0, 2, 1)                                  # [B, T, k]
    keep = slot < C                                                                  # [B, T, k]
    # [B, T, k, E, C] summed over k: one (expert, slot) per kept assignment.
    place = onehot[..., None] * jax.nn.one_hot(jnp.where(keep, slot, C), C, dtype=jnp.int32)[..., None, :]
    dispatch = jnp.sum(place, axis=2).astype(dt)                                     # [B, T, E, C]
    combine = jnp.einsum('btkec,btk->btec', place.astype(jnp.float32), weights)      # f32[B, T, E, C]
    # Tokens move to their experts' shards here: [E, B, C, d] is split by expert.
    xe = constrain(jnp.einsum('btec,btd->ebcd', dispatch, x), ('expert', 'batch', None, 'embed'))
    up = {n: jnp.einsum('ebcd,edf->ebcf', xe, cast(w[n], dt)) for n in self.names}
    out = jnp.einsum('ebcf,efd->ebcd', self._hidden(up), cast(w['wo'], dt))          # [E, B, C, d]
    out = constrain(out, ('expert', 'batch', None, 'embed'))
    y = jnp.einsum('btec,ebcd->btd', combine, out.astype(jnp.float32))
    dropped = 1.0 - jnp.mean(keep.astype(jnp.float32))
    return y.astype(dt), dropped
