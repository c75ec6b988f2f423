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
from typing import Any, NamedTuple

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


class _Split(NamedTuple):
  """One stack call's params, split for the scan (`Stack._split_params`)."""

  params: bx.Params  # every param, after the call's one Rng draw
  outer: dict[Path, bx.Param]  # params outside the block: every layer sees them whole
  stacked: dict[Path, Any]  # block param values, each [num_layers, ...]
  layer_static: dict[Path, tuple[bool, bx.Metadata]]  # block params: (trainable, one layer's metadata)
  key: jax.Array | None  # the call's key from the stack's Rng (None without one)
  rng_paths: tuple[Path, ...]  # (seed, counter) paths of the stack's Rng, or ()

  def layer_params(self, state: dict[Path, Any], vals: dict[Path, Any], idx: jax.Array) -> bx.Params:
    """Layer idx's Params: the outer ones with the carried `state` values, the
    block's from this layer's slice `vals`, and the stack's Rng at seed
    `fold_in(key, idx)`, counter 0."""
    data = dict(self.outer)
    for p, v in state.items():
      data[p] = self.outer[p].replace(value=v)
    for p, v in vals.items():
      data[p] = bx.Param(v, *self.layer_static[p])
    if self.key is not None:
      seed_path, counter_path = self.rng_paths
      data[seed_path] = self.outer[seed_path].replace(value=jax.random.fold_in(self.key, idx))
      data[counter_path] = self.outer[counter_path].replace(value=jnp.zeros((), jnp.uint32))
    return bx.Params.from_items(data, locked=self.params.is_locked)


class _Plan(NamedTuple):
  """What the scan moves besides x (`Stack._plan_carry`)."""

  carry: tuple[Path, ...]  # outer params the block updates: scan carry
  emit: tuple[Path, ...]  # block params the block updates: stacked per-layer outputs


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
  #
  # A call runs `_run`'s five steps; the first call also runs `_init`. Each
  # step is a method whose docstring says what it decides and why.

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

  # -- init: the block's lazy init, vmapped over layers --------------------------

  def _init(self, params: bx.Params, x: Any, xs: Any, per_layer: bool, args: tuple, kwargs: dict) -> bx.Params:
    """Creates the stacked block params: `_init_layer` vmapped over the layers.

    Every param the block creates comes back with a leading axis of size
    num_layers and is stored once, with a leading 'layers' logical axis. The
    whole init is one `jax.jit`: one compilation instead of op-by-op dispatch
    when called eagerly, and XLA drops the throwaway forward (only the
    created params are outputs). Inside an outer jit or eval_shape this is
    simply inlined.
    """
    if self.rng is not None:
      self.rng.get_seed(params)  # a clear RngNotSeededError before tracing
    static: dict[Path, tuple[bool, bx.Metadata]] = {}  # (trainable, metadata), filled while tracing

    def init_all(params: bx.Params, x: Any, xs: Any) -> dict[Path, Any]:
      init_one = self._init_layer(params, x, static, lambda p, x, x_i: self._call_block(p, x, x_i, per_layer, args, kwargs))
      return jax.vmap(init_one)(jnp.arange(self.num_layers, dtype=jnp.int32), xs)

    values = jax.jit(init_all)(params, x, xs if per_layer else None)
    data = dict(params.items())
    for p, v in values.items():
      trainable, meta = static[p]
      data[p] = bx.Param(v, trainable, stacked_metadata(meta, np.ndim(v) - 1))
    return bx.Params.from_items(data, locked=params.is_locked)

  def _init_layer(self, params: bx.Params, x: Any, static: dict, call: Callable) -> Callable:
    """`init_one(i, x_i) -> {path: value}`: the params layer `i` creates.

    Randomness: every Rng stream outside the block (usually just the stack's
    `rng`) restarts for layer i at seed `fold_in(fold_in(seed, crc32(stack
    path)), i)`, counter 0. Layers start different, and the init depends on
    the stack's path, not on the counter: adding a module before the stack
    does not change the stack's init.

    What is stored is the value each param was *created* with
    (`bx.record_created`): a stateful block (BatchNorm) creates its state
    and updates it in the same call, here on the stack's input rather than
    the layer's. Params created outside the block's graph path are an error.
    """
    where = bx.path_to_str(self.graph.path)
    before = dict(params.items())
    salt = jnp.uint32(zlib.crc32(where.encode()))
    streams = self._rng_streams(before)
    init_keys = {s: jax.random.fold_in(before[s].value, salt) for s, _ in streams}

    def init_one(i: jax.Array, x_i: Any) -> dict[Path, Any]:
      data = dict(before)
      for seed, counter in streams:
        data[seed] = before[seed].replace(value=jax.random.fold_in(init_keys[seed], i))
        data[counter] = before[counter].replace(value=jnp.zeros((), jnp.uint32))
      with bx.record_created() as created:
        _, _, out = call(bx.Params.from_items(data), x, x_i)
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

    return init_one

  # -- run: split params, plan the carry, build the layer, scan, reassemble -----

  def _run(self, params: bx.Params, x: Any, xs: Any, args: tuple, kwargs: dict,
           per_layer: bool = False) -> tuple[tuple[Any, Any], bx.Params]:
    """`((y, ys), params)` of one stack call, in five steps.

    1. `_init_if_needed`: the first call creates the stacked params (`_init`).
    2. `_split_params`: stacked block params (the scan slices them per layer)
       apart from the outer ones (every layer sees them whole); the call's
       one Rng draw.
    3. `_plan_carry`: a shape-only probe trace finds which params the block
       updates: those become scan carry or per-layer outputs.
    4. `_layer_fn`: one layer as arrays in, arrays out, under remat.
    5. `_scan` (or `_loop` when scan=False) runs it; the updated values go
       back into params.
    """
    if not isinstance(params, bx.Params):
      raise TypeError(f'Stack {bx.path_to_str(self.graph.path)} expected Params as its first argument, '
                      f'got {type(params).__name__}.')
    x = jax.tree.map(jnp.asarray, x)  # Python scalars become arrays: x is the scan carry
    params = self._init_if_needed(params, x, xs, per_layer, args, kwargs)
    split = self._split_params(params)
    call = lambda p, x, x_i: self._call_block(p, x, x_i, per_layer, args, kwargs)
    plan = self._plan_carry(split, call, x, xs)
    layer = self._layer_fn(split, plan, call)
    state = {p: split.outer[p].value for p in plan.carry}
    idx = jnp.arange(self.num_layers, dtype=jnp.int32)
    run = self._scan if self.scan else self._loop
    y, state, emitted, ys = run(layer, x, state, split.stacked, idx, xs)
    return (y, ys), split.params.replace_values({**state, **emitted})

  def _init_if_needed(self, params: bx.Params, x: Any, xs: Any, per_layer: bool, args: tuple,
                      kwargs: dict) -> bx.Params:
    """Params with the stacked block params: as given, or created by `_init`.

    The first call on params without block params is the init (lazy, as for
    every blox module); on locked params that is an error, since locked
    params must already hold every weight.
    """
    if any(self._is_block(p) for p in params):
      return params
    if params.is_locked:
      raise bx.ParamsLockedError(
          f'Stack {bx.path_to_str(self.graph.path)}: no block params under '
          f'{bx.path_to_str(self.block_path)} and params are locked. Run the model once on '
          'unlocked params to initialise it.'
      )
    return self._init(params, x, xs, per_layer, args, kwargs)

  def _split_params(self, params: bx.Params) -> _Split:
    """Splits params into stacked block params and outer ones; draws the call's key.

    Block params are what the scan slices: each must have a leading axis of
    size num_layers (a per-layer layout, `layer_0/...`, is an error naming
    `restack`). Layer i sees its slice with the metadata of one layer (the
    'layers' axis name removed). The stack's Rng is drawn once here, before
    the split, so the params returned by the call carry its counter + 1.
    """
    where = bx.path_to_str(self.graph.path)
    stacked = {p: q for p, q in params.items() if self._is_block(p)}
    for p, param in stacked.items():
      shape = np.shape(param.value)
      if not shape or shape[0] != self.num_layers:
        raise ValueError(
            f'Stack {where}: param {bx.path_to_str(p)} has shape {shape}; every block param '
            f'needs a leading layer axis of size num_layers={self.num_layers}, i.e. the same '
            'param for every layer. Per-layer params (layer_0/...) convert with '
            'blox_scale.stacking.layout.restack.'
        )
    key, rng_paths = None, ()
    if self.rng is not None:
      key, params = self.rng(params)  # one draw per stack call
      rng_paths = (self.rng.param_path('seed'), self.rng.param_path('counter'))
    return _Split(
        params=params,
        outer={p: q for p, q in params.items() if not self._is_block(p)},
        stacked={p: q.value for p, q in stacked.items()},
        layer_static={p: (q.trainable, layer_metadata(q.metadata)) for p, q in stacked.items()},
        key=key,
        rng_paths=rng_paths,
    )

  def _plan_carry(self, split: _Split, call: Callable, x: Any, xs: Any) -> _Plan:
    """Which params the scan carries and which it emits, from one probe trace.

    The rule (docs/stack.md, "What the block updates"): trace one layer on
    abstract inputs (`jax.eval_shape`: nothing is computed) and compare each
    param value the block returns with the one it was given, by identity. A
    blox module returns the very array it received for a param it does not
    update, and a new one (`set_param`) for one it does. Updated outer
    params (another Rng's counter) become scan carry; updated block params
    (BatchNorm statistics) become per-layer outputs. Everything else is
    closed over or sliced by the scan and never copied out (a stacked copy
    of unchanged weights would cost a full copy of the model). The probe
    also checks x's shape and dtype and that the block creates no params.
    """
    carry_candidates = {p: q.value for p, q in split.outer.items() if p not in split.rng_paths}
    changed: dict[str, tuple[Path, ...]] = {}

    def probe(x, state, vals, idx, x_i):
      data = split.layer_params(state, vals, idx)
      y, _, out = call(data, x, x_i)
      self._check_layer(x, y, data, out)
      changed['carry'] = tuple(p for p in state if out[p].value is not data[p].value)
      changed['emit'] = tuple(p for p in vals if out[p].value is not data[p].value)
      return y

    abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), t)
    slice0 = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), t)
    jax.eval_shape(probe, abstract(x), abstract(carry_candidates), slice0(split.stacked),
                   jax.ShapeDtypeStruct((), jnp.int32), slice0(xs))
    return _Plan(carry=changed['carry'], emit=changed['emit'])

  def _layer_fn(self, split: _Split, plan: _Plan, call: Callable) -> Callable:
    """One layer, `(x, state, vals, idx, x_i) -> (y, state, emitted, y_i)`, under remat.

    Arrays in and out, not Params: that is what `lax.scan` slices and carries
    and what `jax.checkpoint` (the stack's remat policy) wraps. `state` holds
    the carried outer values, `vals` layer idx's slice of the stacked ones;
    only `plan.carry` and `plan.emit` values come out. A param the probe saw
    unchanged that changes on this trace is an error (the block's updates
    depended on trace-time Python state).
    """
    where = bx.path_to_str(self.graph.path)

    def layer(x, state, vals, idx, x_i):
      data = split.layer_params(state, vals, idx)
      y, y_i, out = call(data, x, x_i)
      for p in data:
        if p not in state and p not in plan.emit and p not in split.rng_paths and out[p].value is not data[p].value:
          raise RuntimeError(
              f'Stack {where}: the block changed {bx.path_to_str(p)} on one trace but not on '
              'another; its state updates must not depend on trace-time Python state.'
          )
      new_state = {p: out[p].value for p in state}
      emitted = {p: out[p].value for p in plan.emit}
      return y, new_state, emitted, y_i

    return remat_lib.checkpoint(layer, self.remat, self.remat_names, prevent_cse=not self.scan)

  def _check_layer(self, x: Any, y: Any, data: bx.Params, out: bx.Params) -> None:
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
