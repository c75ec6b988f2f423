"""Stack: one block, `num_layers` times, as a raw `jax.lax.scan` over stacked params.

The block module is built once; each of its params is stored once with a
leading layer axis (`[num_layers, ...]`, logical axes `('layers', ...)`).
Compile time and the number of Params leaves stay flat in depth. The scan
body is what a user would write by hand: slice layer i's params, fold i into
the RNG key, call the block under `jax.checkpoint(policy=...)`, and return
the carry plus only what genuinely differs per layer.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import blox as bx
from blox import Path
from blox_scale.stacking import remat as remat_lib
from blox_scale.stacking.layout import layer_metadata, stacked_metadata

BlockFactory = Callable[[bx.Graph], bx.Module]


def _describe(tree: Any) -> str:
  leaves = [f'{jnp.dtype(l.dtype).name}{list(np.shape(l))}' for l in jax.tree.leaves(tree)]
  return leaves[0] if len(leaves) == 1 else f'({", ".join(leaves)})'


def _nested_group_size(nested: bool | int, num_layers: int, where: str) -> int | None:
  """Inner group size k of the sqrt(L) nested scan, or None for a flat scan."""
  if nested is False:
    return None
  if nested is True:
    divisors = [k for k in range(2, num_layers) if num_layers % k == 0]
    if not divisors:
      raise ValueError(
          f'Stack {where}: nested=True needs num_layers with a divisor other than '
          f'1 and itself, got num_layers={num_layers}. Pass nested=k (k divides '
          'num_layers), or run the odd layers in a second Stack.'
      )
    root = math.sqrt(num_layers)
    return min(divisors, key=lambda k: (abs(k - root), k))
  if isinstance(nested, int) and not isinstance(nested, bool):
    if nested < 1 or num_layers % nested:
      raise ValueError(
          f'Stack {where}: num_layers={num_layers} is not divisible by the nested '
          f'group size nested={nested}. Pick a divisor of num_layers.'
      )
    return nested
  raise TypeError(f'Stack {where}: nested must be a bool or an int group size, got {nested!r}.')


class Stack(bx.Module):
  """`num_layers` applications of one block, scanned over stacked params.

  Args:
    graph: this stack's node; the block is built at `graph.child('block')`.
    block: `graph -> Module`, a module called as `x, params = block(params,
      x, *args, **kwargs)` with `x` keeping its structure, shapes and dtypes.
      A list of k factories is a repeating pattern of k different blocks:
      the scanned unit is `bs.Group(g, block)` and `num_layers` counts the
      sub-blocks (it must be divisible by k; the scan runs num_layers/k steps).
    num_layers: number of layers (>= 1); the leading axis of every block
      param has size `self.num_layers` (num_layers / k for a pattern).
    rng: the shared `bx.Rng` the block draws from. Each call draws ONE key;
      layer i sees that stream with seed `fold_in(key, i)` and counter 0.
      After the stack the stream's seed is unchanged and its counter advanced
      by one. At init, layer i's seed is `fold_in(fold_in(seed,
      crc32(stack path)), i)`, so init does not depend on what was drawn
      before the stack.
    remat: a name from `blox_scale.stacking.remat.POLICIES` or a callable policy.
    remat_names: names for 'save_names' / 'offload_names'.
    unroll: passed to `jax.lax.scan`.
    scan: False runs the same stacked params in a Python loop (debugging,
      comparison); results match the scan.
    nested: True (or an int group size k dividing num_layers) scans
      num_layers/k groups of k layers with each group under
      `jax.checkpoint(nothing_saveable)`: O(L/k + k) saved carries instead
      of O(L), for about one extra forward. Ignored when scan=False.
  """

  def __init__(
      self,
      graph: bx.Graph,
      block: BlockFactory,
      num_layers: int,
      *,
      rng: bx.Rng | None = None,
      remat: str | Callable[..., Any] = 'full',
      remat_names: Sequence[str] = (),
      unroll: int | bool = 1,
      scan: bool = True,
      nested: bool | int = False,
  ) -> None:
    super().__init__(graph)
    where = bx.path_to_str(graph.path)
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
      raise ValueError(f'Stack {where}: num_layers must be an int >= 1, got {num_layers!r}.')
    if isinstance(block, (list, tuple)):
      from blox_scale.stacking.group import Group  # a pattern of k different blocks
      k = len(block)
      if k == 0 or num_layers % k:
        raise ValueError(
            f'Stack {where}: num_layers={num_layers} is not divisible by the group size '
            f'{k} (the pattern of {k} blocks). Stack num_layers // {k} = {num_layers // max(k, 1)} '
            'repeats here and run the remaining layers in a second Stack of the '
            'leftover blocks (see docs/stack.md, "Heterogeneous layers").'
        )
      pattern = list(block)
      block = lambda g: Group(g, pattern)
      num_layers //= k
    if not callable(block):
      raise TypeError(f'Stack {where}: block must be a callable graph -> Module (e.g. lambda g: MyBlock(g)), got {block!r}.')
    if rng is not None and not isinstance(rng, bx.Rng):
      raise TypeError(f'Stack {where}: rng must be a bx.Rng or None, got {type(rng).__name__}.')
    remat_lib.resolve_policy(remat, remat_names)  # fail at construction on a bad name
    self.num_layers = int(num_layers)
    self.rng = rng
    self.remat = remat
    self.remat_names = tuple(remat_names)
    self.unroll = unroll
    self.scan = scan
    self.group_size = _nested_group_size(nested, self.num_layers, where)
    self.block = block(graph.child('block'))
    if not isinstance(self.block, bx.Module):
      raise TypeError(f'Stack {where}: block(graph) must return a bx.Module, got {type(self.block).__name__}.')
    if self.block.graph.parent is not graph:
      raise ValueError(f'Stack {where}: the block must be built on the graph it is given (graph.child("block")).')

  # -- public calls ------------------------------------------------------------

  def __call__(self, params: bx.Params, x: Any, *args: Any, **kwargs: Any) -> tuple[Any, bx.Params]:
    """`y, params = stack(params, x, *args, **kwargs)`; args reach every layer."""
    (y, _), params = self._run(params, x, None, args, kwargs)
    return y, params

  def call_per_layer(self, params: bx.Params, x: Any, xs: Any, *args: Any, **kwargs: Any) -> tuple[tuple[Any, Any], bx.Params]:
    """`(y, ys), params = stack.call_per_layer(params, x, xs, ...)`.

    `xs` is a pytree whose leaves have a leading axis of size num_layers (a
    KV cache: `[num_layers, batch, seq, kv_heads, head_dim]`). The block is
    called as `((x, y_i), params) = block(params, x, x_i, ...)`; `ys` stacks
    the `y_i` along a new leading layer axis.
    """
    for leaf in jax.tree.leaves(xs):
      if np.ndim(leaf) < 1 or np.shape(leaf)[0] != self.num_layers:
        raise ValueError(
            f'Stack {bx.path_to_str(self.graph.path)}.call_per_layer: every leaf of xs needs a '
            f'leading layer axis of size num_layers={self.num_layers}, got shape '
            f'{np.shape(leaf)}.'
        )
    return self._run(params, x, xs, args, kwargs, per_layer=True)

  def init(self, params: bx.Params, x: Any, *args: Any, **kwargs: Any) -> bx.Params:
    """Only the lazy init of `stack(params, x, ...)`: the stacked block params, no run.

    Returns `params` unchanged when the block params exist already. The
    forward inside init is compiled away (one jitted, vmapped call).
    """
    if any(self._is_block(p) for p in params):
      return params
    return self._init(params, jax.tree.map(jnp.asarray, x), None, False, args, kwargs)

  @property
  def block_path(self) -> Path:
    """Where the stacked block params live: `graph.path + ('block',)`."""
    return self.block.graph.path

  # -- internals ---------------------------------------------------------------

  def _is_block(self, path: Path) -> bool:
    n = len(self.block_path)
    return path[:n] == self.block_path

  def _call_block(self, params: bx.Params, x: Any, x_i: Any, per_layer: bool,
                  args: tuple, kwargs: dict) -> tuple[Any, Any, bx.Params]:
    if per_layer:
      (y, y_i), params = self.block(params, x, x_i, *args, **kwargs)
      return y, y_i, params
    y, params = self.block(params, x, *args, **kwargs)
    return y, None, params

  def _rng_streams(self, data: dict[Path, bx.Param]) -> list[tuple[Path, Path]]:
    """(seed path, counter path) of every Rng stream outside the block."""
    streams = []
    for path, param in data.items():
      if param.metadata.get('tag') == 'rng_seed' and not self._is_block(path):
        counter = path[:-1] + ('counter',)
        if counter in data:
          streams.append((path, counter))
    return streams

  def _init(self, params: bx.Params, x: Any, xs: Any, per_layer: bool, args: tuple, kwargs: dict) -> bx.Params:
    """Creates the stacked block params: the block's init vmapped over layers."""
    where = bx.path_to_str(self.graph.path)
    if self.rng is not None:
      self.rng.get_seed(params)  # a clear RngNotSeededError before tracing
    # Every Rng stream outside the block (usually just `rng`) restarts per
    # layer from a key that depends on the stack's path, not on the counter:
    # adding a module before the stack must not change the stack's init.
    salt = jnp.uint32(zlib.crc32(where.encode()))
    static: dict[Path, tuple[bool, bx.Metadata]] = {}

    def init_all(params: bx.Params, x: Any, xs: Any) -> dict[Path, Any]:
      before = dict(params.items())
      streams = self._rng_streams(before)
      init_keys = {s: jax.random.fold_in(before[s].value, salt) for s, _ in streams}

      def init_one(i: jax.Array, x_i: Any) -> dict[Path, Any]:
        data = dict(before)
        for seed, counter in streams:
          data[seed] = before[seed].replace(value=jax.random.fold_in(init_keys[seed], i))
          data[counter] = before[counter].replace(value=jnp.zeros((), jnp.uint32))
        # A stateful block (BatchNorm) creates its state and updates it in the
        # same call, on the stack's input rather than the layer's: store the
        # value each param was created with, not the updated one.
        with bx.record_created() as created:
          _, _, out = self._call_block(bx.Params.from_items(data), x, x_i, per_layer, args, kwargs)
        new = [p for p in out if p not in before]
        outside = [bx.path_to_str(p) for p in new if not self._is_block(p)]
        if outside:
          raise ValueError(
              f'Stack {where}: the block created params outside its own graph path '
              f'{bx.path_to_str(self.block_path)}: {outside}. A stacked block may read outer '
              'params (embeddings, the shared Rng) but must create its own under '
              'its graph node; create shared params before the stack.'
          )
        values = {}
        for p in new:
          param = created.get(p, out[p])
          static[p] = (param.trainable, param.metadata)
          values[p] = param.value
        return values

      return jax.vmap(init_one)(jnp.arange(self.num_layers, dtype=jnp.int32), xs)

    # jit: one compilation instead of op-by-op dispatch when called eagerly,
    # and XLA drops the throwaway forward (only the created params are
    # outputs). Inside an outer jit or eval_shape this is simply inlined.
    values = jax.jit(init_all)(params, x, xs if per_layer else None)
    data = dict(params.items())
    for p, v in values.items():
      trainable, meta = static[p]
      data[p] = bx.Param(v, trainable, stacked_metadata(meta, np.ndim(v) - 1))
    return bx.Params.from_items(data, locked=params.is_locked)

  def _run(self, params: bx.Params, x: Any, xs: Any, args: tuple, kwargs: dict,
           per_layer: bool = False) -> tuple[tuple[Any, Any], bx.Params]:
    where = bx.path_to_str(self.graph.path)
    if not isinstance(params, bx.Params):
      raise TypeError(f'Stack {where} expected Params as its first argument, got {type(params).__name__}.')
    x = jax.tree.map(jnp.asarray, x)  # Python scalars become arrays: x is the scan carry
    if not any(self._is_block(p) for p in params):
      if params.is_locked:
        raise bx.ParamsLockedError(
            f'Stack {where}: no block params under {bx.path_to_str(self.block_path)} and params '
            'are locked. Run the model once on unlocked params to initialise it.'
        )
      params = self._init(params, x, xs, per_layer, args, kwargs)

    L = self.num_layers
    stacked = {p: v for p, v in params.items() if self._is_block(p)}
    for p, param in stacked.items():
      shape = np.shape(param.value)
      if not shape or shape[0] != L:
        raise ValueError(
            f'Stack {where}: param {bx.path_to_str(p)} has shape {shape}; every block param '
            f'needs a leading layer axis of size num_layers={L}, i.e. the same '
            'param for every layer. Per-layer params (layer_0/...) convert with '
            'blox_scale.stacking.layout.restack.'
        )
    layer_static = {p: (q.trainable, layer_metadata(q.metadata)) for p, q in stacked.items()}

    rng_paths: tuple[Path, ...] = ()
    key = None
    if self.rng is not None:
      key, params = self.rng(params)  # one draw per stack call
      seed_path, counter_path = self.rng.param_path('seed'), self.rng.param_path('counter')
      rng_paths = (seed_path, counter_path)
    outer = {p: q for p, q in params.items() if not self._is_block(p)}

    def layer_params(state: dict, vals: dict, idx: jax.Array) -> dict[Path, bx.Param]:
      data = dict(outer)
      for p, v in state.items():
        data[p] = outer[p].replace(value=v)
      for p, v in vals.items():
        data[p] = bx.Param(v, *layer_static[p])
      if key is not None:
        data[seed_path] = outer[seed_path].replace(value=jax.random.fold_in(key, idx))
        data[counter_path] = outer[counter_path].replace(value=jnp.zeros((), jnp.uint32))
      return data

    # Probe trace (abstract, nothing computed): which outer params does the
    # block update (they become scan carry), which block params (per-layer
    # outputs)? Unchanged ones are detected by identity and never copied out.
    carry_candidates = {p: q.value for p, q in outer.items() if p not in rng_paths}
    changed: dict[str, list[Path]] = {}

    def probe(x, state, vals, idx, x_i):
      data = layer_params(state, vals, idx)
      y, y_i, out = self._call_block(bx.Params.from_items(data, locked=params.is_locked), x, x_i, per_layer, args, kwargs)
      self._check_layer(x, y, data, out)
      changed['outer'] = [p for p in state if out[p].value is not data[p].value]
      changed['block'] = [p for p in vals if out[p].value is not data[p].value]
      return y

    abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), t)
    slice0 = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), t)
    vals_all = {p: q.value for p, q in stacked.items()}
    jax.eval_shape(probe, abstract(x), abstract(carry_candidates), slice0(vals_all),
                   jax.ShapeDtypeStruct((), jnp.int32), slice0(xs))
    carry_paths, emit_paths = changed['outer'], changed['block']

    def layer(x, state, vals, idx, x_i):
      """One layer: arrays in, arrays out (what jax.checkpoint wraps)."""
      data = layer_params(state, vals, idx)
      y, y_i, out = self._call_block(bx.Params.from_items(data, locked=params.is_locked), x, x_i, per_layer, args, kwargs)
      for p in data:
        if p not in state and p not in emit_paths and p not in rng_paths and out[p].value is not data[p].value:
          raise RuntimeError(
              f'Stack {where}: the block changed {bx.path_to_str(p)} on one trace but not on '
              'another; its state updates must not depend on trace-time Python state.'
          )
      new_state = {p: out[p].value for p in state}
      emitted = {p: out[p].value for p in emit_paths}
      return y, new_state, emitted, y_i

    layer = remat_lib.checkpoint(layer, self.remat, self.remat_names, prevent_cse=not self.scan)
    state = {p: outer[p].value for p in carry_paths}
    idx = jnp.arange(L, dtype=jnp.int32)
    if self.scan:
      y, state, emitted, ys = self._scan(layer, x, state, vals_all, idx, xs)
    else:
      y, state, emitted, ys = self._loop(layer, x, state, vals_all, idx, xs)

    return (y, ys), params.replace_values({**state, **emitted})

  def _check_layer(self, x: Any, y: Any, data: dict, out: bx.Params) -> None:
    where = bx.path_to_str(self.graph.path)
    same = jax.tree.structure(x) == jax.tree.structure(y) and all(
        np.shape(a) == np.shape(b) and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    if not same:
      raise ValueError(
          f'Stack {where}: the block {type(self.block).__name__} must return x with the '
          f'shape and dtype it received (x is the scan carry from layer to layer); '
          f'got input {_describe(x)} and output {_describe(y)}. Project back to the '
          'input shape, or cast to the input dtype, inside the block.'
      )
    new = [bx.path_to_str(p) for p in out if p not in data]
    if new:
      raise ValueError(
          f'Stack {where}: the block created params {new} after the stack was '
          'initialised. Every layer must have the same params; create them all '
          'on the first call (no params that depend on the layer or the input).'
      )

  def _scan(self, layer, x, state, vals, idx, xs):
    def body(carry, xs_t):
      x, state = carry
      vals_t, idx_t, x_t = xs_t
      x, state, emitted, y_t = layer(x, state, vals_t, idx_t, x_t)
      return (x, state), (emitted, y_t)

    if self.group_size is None:
      (x, state), (emitted, ys) = jax.lax.scan(body, (x, state), (vals, idx, xs), unroll=self.unroll)
      return x, state, emitted, ys
    # Nested: an outer scan over groups, each group an inner scan under
    # jax.checkpoint(nothing_saveable). The forward keeps one carry per group;
    # the backward recomputes a group's inner scan (keeping its k carries),
    # then runs the per-layer backward inside it.
    k = self.group_size
    groups = self.num_layers // k
    grouped = jax.tree.map(lambda a: a.reshape((groups, k) + a.shape[1:]), (vals, idx, xs))

    def group_body(carry, xs_g):
      return jax.lax.scan(body, carry, xs_g, unroll=self.unroll)

    group_body = jax.checkpoint(group_body, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    (x, state), (emitted, ys) = jax.lax.scan(group_body, (x, state), grouped)
    emitted, ys = jax.tree.map(lambda a: a.reshape((self.num_layers,) + a.shape[2:]), (emitted, ys))
    return x, state, emitted, ys

  def _loop(self, layer, x, state, vals, idx, xs):
    emitted_all, ys_all = [], []
    for i in range(self.num_layers):
      take = lambda a: a[i]
      x, state, emitted, y_i = layer(x, state, jax.tree.map(take, vals), idx[i], jax.tree.map(take, xs))
      emitted_all.append(emitted)
      ys_all.append(y_i)
    restack = lambda *a: jnp.stack(a)
    emitted = jax.tree.map(restack, *emitted_all)
    ys = jax.tree.map(restack, *ys_all)
    return x, state, emitted, ys
