"""remat='auto': the policy with the least recomputation whose compiled train step fits.

At compile time the train step is lowered and compiled once per candidate, in
order of increasing recomputation, and XLA's own memory analysis of each
(`compiled.memory_analysis()`) gives its per-device peak:

    peak = arguments + outputs - donated aliases + temporaries

The first candidate whose peak fits the budget wins; the ones after it would
only recompute more. Candidates, least recomputation first:

  'none'        no jax.checkpoint: every residual kept (no recomputation)
  'dots'        every matmul output kept; elementwise work recomputed
  'save_names'  only the block's named activations kept (`BLOCK_NAMES`, or
                `model.remat_names` when set); attention core and the rest recomputed
  'full'        only each layer's input kept; the whole layer recomputed
  'nested'      'full' in a nested sqrt(L) scan: one carry per group of layers
                kept; about one more forward of recomputation

XLA's CPU compiler schedules differently from GPU/TPU compilers: on those, the
peaks are estimates within tens of percent (see docs/scaling.md), so leave
some headroom in the budget (the default is the device's memory limit, which
XLA already reports net of its own reservations).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

CANDIDATES = ('none', 'dots', 'save_names', 'full', 'nested')
# The activations our TransformerBlock tags with `checkpoint_name`.
BLOCK_NAMES = ('qkv', 'attn_out', 'mlp_hidden', 'mlp_out')
GiB = 1024 ** 3
MiB = 1024 ** 2


class RematBudgetError(ValueError):
  """No candidate policy's compiled train step fits the per-device memory budget."""


@dataclasses.dataclass(frozen=True)
class Measured:
  """XLA's memory analysis of one candidate's compiled train step (bytes per device)."""
  remat: str
  peak_bytes: int = 0
  temp_bytes: int = 0
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  compile_s: float = 0.0
  error: str = ''  # set when the candidate did not compile (it is then skipped)


@dataclasses.dataclass(frozen=True)
class Choice:
  """The chosen policy, the budget, and every candidate measured on the way."""
  remat: str
  budget_bytes: int
  measured: tuple[Measured, ...]
  compiled: Any = dataclasses.field(default=None, repr=False, compare=False)

  def record(self) -> dict[str, Any]:
    """Flat figures for metrics.jsonl (`remat_auto_*` keys)."""
    out: dict[str, Any] = {'remat_auto_choice': self.remat, 'remat_auto_budget_bytes': self.budget_bytes}
    for m in self.measured:
      if m.error:
        out[f'remat_auto_{m.remat}_error'] = m.error
      else:
        out[f'remat_auto_{m.remat}_peak_bytes'] = m.peak_bytes
        out[f'remat_auto_{m.remat}_temp_bytes'] = m.temp_bytes
    return out

  def summary(self) -> str:
    """One log line: the choice, the budget and each measured peak."""
    figures = ', '.join(f'{m.remat} {"n/a" if m.error else _fmt(m.peak_bytes)}' for m in self.measured)
    return f'remat=auto chose {self.remat!r} (budget {_fmt(self.budget_bytes)}/device; peaks: {figures})'


def _fmt(n: float) -> str:
  return f'{n / GiB:.2f} GiB' if n >= GiB else f'{n / MiB:.1f} MiB'


def peak_bytes(analysis: Any) -> int:
  """Per-device peak of a compiled step: arguments + outputs - donated aliases + temporaries."""
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """Memory of one device: `memory_stats()['bytes_limit']` (GPU/TPU); on CPU the
  host's physical memory divided among its local CPU devices; None if unknown."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001  (backends without memory stats)
    stats = {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'cpu':
    try:
      host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
      return None
    return host // max(len(jax.local_devices(backend='cpu')), 1)
  return None


def budget_bytes(budget_gib: float, device: jax.Device | None = None) -> int:
  """`model.remat_budget_gib` in bytes; 0 means the device's memory (an error if unknown)."""
  if budget_gib < 0:
    raise ValueError(f'model.remat_budget_gib={budget_gib} must be >= 0 (0 = the device memory).')
  if budget_gib > 0:
    return int(budget_gib * GiB)
  known = device_memory_bytes(device)
  if known is None:
    raise ValueError(
        'model.remat=auto needs a per-device memory budget, and this device reports none: '
        'set model.remat_budget_gib (GiB per device).')
  return known


def candidate_config(model: Any, name: str) -> Any:
  """The `ModelConfig` for one candidate: 'nested' is full remat in a nested scan,
  'save_names' keeps `model.remat_names` or, when unset, `BLOCK_NAMES`."""
  if name not in CANDIDATES:
    raise ValueError(f'remat=auto candidate {name!r} is not one of {", ".join(CANDIDATES)}.')
  if name == 'nested':
    return dataclasses.replace(model, remat='full', remat_nested=True)
  if name == 'save_names':
    return dataclasses.replace(model, remat=name, remat_nested=False, remat_names=tuple(model.remat_names or BLOCK_NAMES))
  return dataclasses.replace(model, remat=name, remat_nested=False)


def choose_remat(lower: Callable[[str], Any], budget: int, candidates: Sequence[str] = CANDIDATES,
                 log: Callable[[str], None] | None = None) -> Choice:
  """Compiles `lower(candidate)` in order and returns the first whose peak fits `budget` bytes.

  Args:
    lower: `candidate name -> jax.stages.Lowered` of the train step built with
      that policy (for 'nested': remat 'full' in a nested scan). A candidate
      whose lowering or compilation raises (e.g. a layer count without a
      divisor for 'nested') is recorded with its error and skipped.
    budget: per-device bytes the step may use.
    candidates: names in order of increasing recomputation.
    log: called with one line per measured candidate.
  Returns:
    A `Choice` holding the compiled step of the chosen policy (`.compiled`).
  Raises:
    RematBudgetError when none fits, naming the smallest peak found.
  """
  measured: list[Measured] = []
  for name in candidates:
    start = time.perf_counter()
    try:
      compiled = lower(name).compile()
      analysis = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001  (a candidate that cannot compile is not a choice)
      measured.append(Measured(name, compile_s=time.perf_counter() - start,
                               error=f'{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""}'))
      if log:
        log(f'remat=auto: {name}: does not compile ({measured[-1].error})')
      continue
    m = Measured(name, peak_bytes(analysis), int(analysis.temp_size_in_bytes), int(analysis.argument_size_in_bytes),
                 int(analysis.output_size_in_bytes), int(analysis.alias_size_in_bytes), time.perf_counter() - start)
    measured.append(m)
    fits = m.peak_bytes <= budget
    if log:
      log(f'remat=auto: {name}: peak {_fmt(m.peak_bytes)} (temp {_fmt(m.temp_bytes)}) '
          f'{"fits" if fits else "exceeds"} {_fmt(budget)}')
    if fits:
      return Choice(name, int(budget), tuple(measured), compiled)
  raise no_fit_error(measured, budget)


def pick(measured: Sequence[Measured], budget: int) -> Measured:
  """The first of `measured` (least recomputation first) that compiled and fits `budget` bytes."""
  for m in measured:
    if not m.error and m.peak_bytes <= budget:
      return m
  raise no_fit_error(measured, budget)


def no_fit_error(measured: Sequence[Measured], budget: int) -> RematBudgetError:
  """The error for "nothing fits": the budget, the smallest peak found, every figure and the fixes."""
  ok = [m for m in measured if not m.error]
  table = '; '.join(f'{m.remat}: {m.error or _fmt(m.peak_bytes)}' for m in measured)
  if not ok:
    return RematBudgetError(f'model.remat=auto: no candidate policy compiled ({table}).')
  smallest = min(ok, key=lambda m: m.peak_bytes)
  return RematBudgetError(
      f'model.remat=auto: no remat policy fits the budget of {_fmt(budget)} per device '
      f'(model.remat_budget_gib). The smallest peak is {smallest.remat!r} at {_fmt(smallest.peak_bytes)} '
      f'({smallest.peak_bytes} bytes). All: {table}. To fit: shard params and optimizer state over '
      'more devices (mesh.fsdp), lower data.batch_size or raise optimizer.grad_accum_steps, shorten '
      'data.seq_len, or raise model.remat_budget_gib if the device has more memory.')
