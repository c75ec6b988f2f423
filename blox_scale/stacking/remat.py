"""Remat (activation checkpointing) policies by name, for `Stack(remat=...)`.

A policy decides which values computed inside one layer are kept for the
backward pass; everything else is recomputed from the layer's saved input.
The names map to JAX's own `jax.checkpoint_policies`, so what a name saves is
exactly what JAX documents for that policy:

  'none'          no `jax.checkpoint` at all: every residual is saved
                  (fastest backward, most memory).
  'full'          `nothing_saveable`: only the layer input (the scan carry) is
                  saved per layer; the backward recomputes the whole layer.
  'dots'          `dots_saveable`: outputs of every matmul (`dot_general`)
                  are saved; elementwise work is recomputed.
  'dots_no_batch' `dots_with_no_batch_dims_saveable`: only matmuls without
                  batch dimensions (weight projections, not attention scores).
  'save_names'    `save_only_these_names(*remat_names)`: only values tagged
                  with `jax.ad_checkpoint.checkpoint_name(x, name)`.
  'offload_names' `save_and_offload_only_these_names`: the named values are
                  saved in host memory (`pinned_host`) instead of device
                  memory, and copied back for the backward pass.

JAX's own names (the attributes of `jax.checkpoint_policies`) are accepted as
written, so a name never means a different policy than JAX documents for it:
`nothing_saveable` (= 'full'), `dots_saveable` and `checkpoint_dots` (= 'dots'),
`dots_with_no_batch_dims_saveable` and `checkpoint_dots_with_no_batch_dims`
(= 'dots_no_batch'), `save_only_these_names` (= 'save_names'),
`save_and_offload_only_these_names` (= 'offload_names'), and the ones without a
short name: `everything_saveable` (under `jax.checkpoint`, saves every residual),
`offload_dot_with_no_batch_dims` (weight matmul outputs to `pinned_host`),
`save_any_names_but_these` (named values except `remat_names`) and
`save_anything_except_these_names` (as JAX 0.10 implements it: saves everything).
`'auto'` is not a policy: the trainer picks one of these from the compiler's
memory analysis (`blox_scale.training.remat_auto`).

Any callable is accepted too and used as the policy unchanged. New names are
added to `POLICIES` / `JAX_NAMES` (plain dicts), not to a chain of ifs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

Policy = Callable[..., Any]
# A builder takes the names given by `remat_names` and returns a policy, or
# None for "do not wrap the layer in jax.checkpoint at all".
PolicyBuilder = Callable[[tuple[str, ...]], Policy | None]

_P = jax.checkpoint_policies


def _needs_names(name: str, names: tuple[str, ...]) -> None:
  if not names:
    raise ValueError(
        f"remat={name!r} needs remat_names=(...): the activation names tagged in "
        "the block with jax.ad_checkpoint.checkpoint_name(x, 'name') (our "
        "transformer uses 'qkv', 'attn_out', 'mlp_hidden', 'mlp_out')."
    )


def _save_names(names: tuple[str, ...]) -> Policy:
  _needs_names('save_names', names)
  return _P.save_only_these_names(*names)


def _offload_names(names: tuple[str, ...]) -> Policy:
  _needs_names('offload_names', names)
  return _P.save_and_offload_only_these_names(
      names_which_can_be_saved=[],
      names_which_can_be_offloaded=list(names),
      offload_src='device',
      offload_dst='pinned_host',
  )


POLICIES: dict[str, PolicyBuilder] = {
    'none': lambda names: None,
    'full': lambda names: _P.nothing_saveable,
    'dots': lambda names: _P.dots_saveable,
    'dots_no_batch': lambda names: _P.dots_with_no_batch_dims_saveable,
    'save_names': _save_names,
    'offload_names': _offload_names,
}


# JAX's own names, each building exactly `jax.checkpoint_policies.<name>`. Kept out
# of POLICIES so that listings of "every policy" (blox-plan --remat all) do not
# compile the same policy twice under two names.
JAX_NAMES: dict[str, PolicyBuilder] = {
    'nothing_saveable': POLICIES['full'],
    'dots_saveable': POLICIES['dots'],
    'checkpoint_dots': POLICIES['dots'],
    'dots_with_no_batch_dims_saveable': POLICIES['dots_no_batch'],
    'checkpoint_dots_with_no_batch_dims': POLICIES['dots_no_batch'],
    'save_only_these_names': POLICIES['save_names'],
    'save_and_offload_only_these_names': POLICIES['offload_names'],
    'everything_saveable': lambda names: _P.everything_saveable,
    'offload_dot_with_no_batch_dims': lambda names: _P.offload_dot_with_no_batch_dims('device', 'pinned_host'),
    'save_any_names_but_these': lambda names: _P.save_any_names_but_these(*names),
    'save_anything_except_these_names': lambda names: _P.save_anything_except_these_names(*names),
}


def valid_names() -> tuple[str, ...]:
  """Every accepted remat name: the short ones, then JAX's own."""
  return tuple(POLICIES) + tuple(JAX_NAMES)


def resolve_policy(remat: str | Policy, remat_names: Sequence[str] = ()) -> tuple[bool, Policy | None]:
  """Returns `(use_checkpoint, policy)` for a remat name or callable policy.

  Raises ValueError for an unknown name, listing the valid ones.
  """
  names = tuple(remat_names)
  if callable(remat):
    return True, remat
  builder = POLICIES.get(remat, JAX_NAMES.get(remat)) if isinstance(remat, str) else None
  if builder is None:
    hint = (" 'auto' is chosen by the trainer (model.remat: auto), not by a Stack: pass the "
            'policy it picked.' if remat == 'auto' else '')
    raise ValueError(
        f'Unknown remat policy {remat!r}. Valid names: {", ".join(sorted(POLICIES))}; or JAX\'s own: '
        f'{", ".join(JAX_NAMES)}; or pass any callable policy from jax.checkpoint_policies.{hint}'
    )
  policy = builder(names)
  return policy is not None, policy


def checkpoint(fn: Callable[..., Any], remat: str | Policy, remat_names: Sequence[str] = (),
               *, prevent_cse: bool = True) -> Callable[..., Any]:
  """`fn` wrapped in raw `jax.checkpoint` with the named policy ('none': `fn`).

  Inside `lax.scan` pass `prevent_cse=False`: the scan already stops XLA
  from merging the recomputation with the forward, and the extra barrier
  only costs speed (see the `jax.checkpoint` docstring).
  """
  use, policy = resolve_policy(remat, remat_names)
  if not use:
    return fn
  return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)
