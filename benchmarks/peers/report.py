"""docs/benchmarks.md and its plots (docs/img/peers_*.png) from the JSON of run.py.

    python benchmarks/peers/report.py benchmarks/peers/results.json [--docs docs]

Everything in the page that is a number comes from the JSON; rerun this after
`python benchmarks/peers/run.py` and commit the JSON, the page and the plots together.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {'raw_jax': 'raw JAX', 'blox': 'blox', 'nnx': 'NNX (nnx.jit)',
          'nnx_functional': 'NNX (split/merge + jax.jit)', 'equinox': 'Equinox'}
COLORS = {'raw_jax': '#444444', 'blox': '#1f77b4', 'nnx': '#ff7f0e', 'nnx_functional': '#ffbb78', 'equinox': '#2ca02c'}
MIB = 2**20


def _ratio(value) -> str:
  return '–' if value is None else f'{value:.2f}x'


def _configs(results: dict, remat: str | None = None, timed: bool = False) -> list[dict]:
  return [c for c in results['configs'] if (remat is None or c['remat'] == remat)
          and (not timed or 'step_ratio' in c['variants']['raw_jax'])]


def ratio_table(results: dict, key: str, absolute: str, unit: str, scale: float, fmt: str, timed: bool = False) -> str:
  names = list(LABELS)
  lines = ['| L | remat | raw JAX | ' + ' | '.join(LABELS[n] for n in names[1:]) + ' |',
           '| ---: | --- | ---: | ' + ' | '.join('---:' for _ in names[1:]) + ' |']
  for c in _configs(results, timed=timed):
    raw = c['variants']['raw_jax']
    cells = [_ratio(c['variants'].get(n, {}).get(key)) for n in names[1:]]
    lines.append(f"| {c['num_layers']} | {c['remat']} | {format(raw[absolute] * scale, fmt)} {unit} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def dispatch_table(results: dict) -> str:
  names = list(LABELS)
  lines = ['| L | ' + ' | '.join(LABELS[n] for n in names) + ' |', '| ---: | ' + ' | '.join('---:' for _ in names) + ' |']
  for L, row in results['dispatch'].items():
    lines.append(f'| {L} | ' + ' | '.join(f"{row[n]['median_us']:.0f} us ({row[n]['ratio']:.2f}x)" for n in names) + ' |')
  leaves = results['dispatch'][next(iter(results['dispatch']))]
  lines.append('')
  lines.append('State leaves flattened per call (params + AdamW state): ' +
               ', '.join(f"{LABELS[n]} {leaves[n]['state_leaves']}" for n in names) + '.')
  return '\n'.join(lines)


def plot_step(results: dict, path: str) -> None:
  configs = _configs(results, timed=True)
  names = list(LABELS)
  fig, ax = plt.subplots(figsize=(8, 3.2))
  width = 0.8 / len(names)
  for i, n in enumerate(names):
    xs = [j + i * width for j, c in enumerate(configs) if n in c['variants']]
    ys = [c['variants'][n]['step_ratio'] for c in configs if n in c['variants']]
    ax.bar(xs, ys, width, label=LABELS[n], color=COLORS[n])
  ax.axhline(1.0, color='black', lw=0.8)
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
  ax.set_xticklabels([f"L={c['num_layers']}\n{c['remat']}" for c in configs])
  ax.set_ylabel('train step time / raw JAX')
  ax.set_title('Train step time relative to raw JAX (median of paired rounds)')
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_by_depth(results: dict, key: str, ylabel: str, title: str, path: str, scale: float = 1.0) -> None:
  remats = list(dict.fromkeys(c['remat'] for c in results['configs']))
  fig, axes = plt.subplots(1, len(remats), figsize=(3.2 * len(remats), 3), sharey=True, squeeze=False)
  for ax, remat in zip(axes[0], remats):
    configs = _configs(results, remat)
    for n in LABELS:
      pts = [(c['num_layers'], c['variants'][n][key] * scale) for c in configs
             if key in c['variants'].get(n, {})]
      if pts:
        ax.plot(*zip(*pts), marker='o', label=LABELS[n], color=COLORS[n])
    ax.set_xscale('log', base=2)
    ax.set_xticks([c['num_layers'] for c in configs], [str(c['num_layers']) for c in configs])
    ax.set_xlabel('layers L')
    ax.set_title(f'remat={remat}')
  axes[0][0].set_ylabel(ylabel)
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_dispatch(results: dict, path: str) -> None:
  names = list(LABELS)
  depths = list(results['dispatch'])
  fig, ax = plt.subplots(figsize=(6, 2.8))
  width = 0.8 / len(depths)
  for i, L in enumerate(depths):
    ax.barh([j + i * width for j in range(len(names))], [results['dispatch'][L][n]['median_us'] for n in names],
            width, label=f'L={L}')
  ax.set_yticks([j + 0.4 - width / 2 for j in range(len(names))], [LABELS[n] for n in names])
  ax.invert_yaxis()
  ax.set_xlabel('us per call (median)')
  ax.set_title('Dispatch: a tiny model\'s train step')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _fig(results: dict, L: int, remat: str, name: str, key: str):
  for c in results['configs']:
    if c['num_layers'] == L and c['remat'] == remat:
      return c['variants'].get(name, {}).get(key)
  return None


def _span(values) -> str:
  values = [round(v, 2) for v in values if v is not None]
  if not values:
    return 'n/a'
  return f'{min(values):.2f}x' if min(values) == max(values) else f'{min(values):.2f}-{max(values):.2f}x'


def _range(values: list[float], fmt: str, unit: str) -> str:
  low, high = format(min(values), fmt), format(max(values), fmt)
  return f'{low}{unit}' if low == high else f'{low}-{high}{unit}'


def _compare(span_text: str, values: list[float], tol: float = 0.05) -> str:
  """'the same as', 'more than' or 'less than' raw JAX, with the measured span."""
  values = [v for v in values if v is not None]
  if all(abs(v - 1.0) <= tol for v in values):
    return f'the same as raw JAX ({span_text})'
  if all(v >= 1.0 - tol for v in values):
    return f'more than raw JAX ({span_text})'
  if all(v <= 1.0 + tol for v in values):
    return f'less than raw JAX ({span_text})'
  return f'{span_text} of raw JAX'


def reading(results: dict) -> str:
  """The short reading; every number in it, and every comparison word, comes from the JSON."""
  timed = _configs(results, timed=True)
  depths = sorted({c['num_layers'] for c in results['configs']})

  def values(key: str, name: str, configs: list[dict]) -> list[float]:
    return [c['variants'][name].get(key) for c in configs if name in c['variants']]

  step = {n: _span(values('step_ratio', n, timed)) for n in LABELS}
  # How much raw JAX's own per-round times move: the noise floor of the step ratios.
  noise = [(max(c['variants']['raw_jax']['step_s']) - min(c['variants']['raw_jax']['step_s']))
           / c['variants']['raw_jax']['step_median_s'] for c in timed]
  temp = {n: values('temp_ratio', n, results['configs']) for n in LABELS}
  nnx_full = [_fig(results, L, 'full', 'nnx_functional', 'temp_ratio') for L in depths]
  compile_ = {n: _span(values('compile_ratio', n, results['configs'])) for n in LABELS}
  raw_compile = [c['variants']['raw_jax']['compile_s'] for c in results['configs']]
  d = results['dispatch']
  disp = {n: _span(d[L][n]['ratio'] for L in d) for n in LABELS}
  first = next(iter(d))
  deviation = max(abs(c['variants'][n]['step_ratio'] - 1.0) for c in timed for n in c['variants'])
  verdict = ('Every ratio is inside that noise: this run does not separate the frameworks on step time.'
             if deviation <= max(noise) else
             'Some ratios exceed that noise; see the table for which configurations.')
  return f"""\
- **Step time** (L={', '.join(str(L) for L in sorted({c['num_layers'] for c in timed}))}): ratios to raw JAX are
  blox {step['blox']}, Equinox {step['equinox']}, NNX {step['nnx_functional']} with split/merge and
  {step['nnx']} with `nnx.jit` (L={depths[0]} only). For scale: raw JAX's own time moved by
  {_range([100 * x for x in noise], '.0f', '%')} between rounds of the same configuration on this shared machine.
  {verdict}
- **XLA temp memory**: blox {_compare(_span(temp['blox']), temp['blox'])}, Equinox
  {_compare(_span(temp['equinox']), temp['equinox'])}, NNX's `nnx.scan` + `nnx.remat`
  {_compare(_span(temp['nnx_functional']), temp['nnx_functional'])}; with `remat=full` NNX needs
  {_span(nnx_full)} of raw JAX's temp bytes at L={', '.join(map(str, depths))}.
- **Compile time** (every variant scans over layers, so depth adds little; raw JAX took
  {_range(raw_compile, '.1f', ' s')} across all configurations, noisy under this load); ratios to raw JAX: blox {compile_['blox']},
  Equinox {compile_['equinox']}, NNX {compile_['nnx_functional']} (split/merge), {compile_['nnx']} (`nnx.jit`).
- **Dispatch** (per-call overhead: what dominates small models, small batches and decode loops):
  blox {disp['blox']} of raw JAX's dict of arrays, NNX split/merge {disp['nnx_functional']},
  Equinox `filter_jit` {disp['equinox']}, `nnx.jit` {disp['nnx']} (L={', '.join(d)};
  raw JAX {d[first]['raw_jax']['median_us']:.0f} us per call at L={first})."""


def render(results: dict, docs: str) -> str:
  env = results['environment']
  s = results['settings']
  shape = s['shape']
  img = os.path.join(docs, 'img')
  os.makedirs(img, exist_ok=True)
  plot_step(results, os.path.join(img, 'peers_step.png'))
  plot_by_depth(results, 'temp_bytes', 'XLA temp MiB', 'XLA temp memory of the train step', os.path.join(img, 'peers_temp.png'), 1 / MIB)
  plot_by_depth(results, 'compile_s', 'seconds', 'Compile time of the train step', os.path.join(img, 'peers_compile.png'))
  plot_dispatch(results, os.path.join(img, 'peers_dispatch.png'))
  versions = ', '.join(f'{k} {v}' for k, v in env['versions'].items())
  load = lambda la: '/'.join(f'{x:.1f}' for x in la)
  checks = results['grad_check']
  return f"""# Benchmarks: blox against raw JAX, Flax NNX and Equinox

<!-- Generated by `python benchmarks/peers/report.py benchmarks/peers/results.json` from the JSON
     that `python benchmarks/peers/run.py` writes. Do not edit by hand. -->

One GPT-2-style model written four ways, each idiomatic for its framework
(code in `benchmarks/peers/`): **raw JAX** (a dict of arrays, `lax.scan` over stacked layer
params, `jax.checkpoint`), **blox** (the project's `TransformerBlock` in a `bs.Stack`, raw
`jax.jit`), **Flax NNX** (blocks created by `nnx.vmap`, run by `nnx.scan` + `nnx.remat`; jitted
both with `nnx.jit` and with Flax's functional `nnx.split`/`nnx.merge` + `jax.jit` pattern) and
**Equinox** (`eqx.filter_vmap` to stack, `lax.scan` over `eqx.partition`ed blocks,
`eqx.filter_checkpoint`, `eqx.filter_jit`).

Model: d_model {shape['d_model']}, {shape['num_heads']} heads, MLP {shape['mlp_dim']}, vocab {shape['vocab']},
seq {shape['seq_len']}, batch {shape['batch']}, float32; AdamW; the train state is donated. Every variant
starts from the same init numbers; before timing, each variant's loss and every gradient leaf are
checked against raw JAX's (all remat policies; worst difference {max(checks.values()):.2f} of the
tolerance), and every configuration's first-step loss too. A mismatch stops the run.

Reproduce (needs the `bench` extra: `pip install -e '.[bench]'`; this run took {env['wall_s'] / 60:.0f} minutes of
wall time{f", {env['cpu_s'] / 60:.0f} of them on the CPU," if 'cpu_s' in env else ''} on the shared machine described below):

```bash
python benchmarks/peers/run.py --out benchmarks/peers/results.json
python benchmarks/peers/report.py benchmarks/peers/results.json
```

## Environment

{env['date_utc']}; {env['platform']} ({env['device']}), {env['cpus']} cores, Python {env['python']}; {versions}.
**The machine was shared** with other jobs: load average (1/5/15 min) {load(env['loadavg_start'])} at the
start and {load(env['loadavg_end'])} at the end, on {env['cpus']} cores. Absolute times are therefore
inflated and noisy; the ratios are paired (each round runs every variant, in a rotated order, and the
ratio is taken within the round; the table gives the median over {s['rounds']} rounds of {s['steps']} step(s)).
Trust the ratios more than the milliseconds, and differences of a few percent not at all.

## Reading

{reading(results)}

Where each wins, on these figures: raw JAX is the floor and the reference, at the price of
writing every layer, the param tree and the remat plumbing by hand. blox's `Stack` hands XLA the
program a hand-written scan gives and adds the least per-call overhead of the three frameworks.
Equinox's compiled step has raw JAX's memory footprint; its cost is per call (`filter_jit` partitions
the module pytree on every call; a plain `jax.jit` over `eqx.partition`ed arrays avoids it). Flax
NNX's mutable objects are the most familiar to PyTorch users; its functional split/merge pattern
removes most of `nnx.jit`'s per-call cost, and its lifted `nnx.scan`/`nnx.remat` deserve a look at
`compiled.memory_analysis()` before a large run.

## Train step time

Ratio to raw JAX (median of paired rounds); the raw JAX column is its median time per step.

{ratio_table(results, 'step_ratio', 'step_median_s', 'ms', 1e3, '.0f', timed=True)}

![train step ratios](img/peers_step.png)

## XLA temp memory

`compiled.memory_analysis().temp_size_in_bytes` of the whole train step (activations kept for the
backward pass and scratch; params and optimizer state are arguments, not temps). Raw JAX column in
MiB. `nnx.jit` has no ahead-of-time lowering; its program is NNX's model code, measured in the split/merge column.

{ratio_table(results, 'temp_ratio', 'temp_bytes', 'MiB', 1 / MIB, '.1f')}

![temp memory by depth](img/peers_temp.png)

## Compile time

Trace + lower + XLA compile of the train step (`jit(...).lower(...).compile()`; for `nnx.jit`, its
first call minus one step). Raw JAX column in seconds.

{ratio_table(results, 'compile_ratio', 'compile_s', 's', 1.0, '.1f')}

![compile time by depth](img/peers_compile.png)

## Dispatch per call

The same train step on a tiny model (d_model 32, seq 8, batch 2): the time per call is then the
framework's per-call overhead (flattening the params and optimizer state, argument checks, the
launch), not FLOPs. Median over {s['dispatch_rounds']} paired rounds of {s['dispatch_calls']} calls.

{dispatch_table(results)}

![dispatch](img/peers_dispatch.png)

A forward-only variant of this measurement (a plain dict against `bx.Params`, no optimizer) is
`python benchmarks/dispatch.py`.
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('results', help='the JSON written by benchmarks/peers/run.py')
  parser.add_argument('--docs', default=os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'docs'))
  args = parser.parse_args()
  with open(args.results) as f:
    results = json.load(f)
  page = render(results, args.docs)
  out = os.path.join(args.docs, 'benchmarks.md')
  with open(out, 'w') as f:
    f.write(page)
  print(f'wrote {out} and {os.path.join(args.docs, "img")}/peers_*.png')


if __name__ == '__main__':
  main()
