"""docs/benchmarks.md is what benchmarks/peers/report.py makes of the committed results JSON."""

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_page_is_generated_from_the_committed_results(tmp_path):
  sys.path.insert(0, str(REPO))
  try:
    from benchmarks.peers import report
  finally:
    sys.path.remove(str(REPO))
  results = json.loads((REPO / 'benchmarks' / 'peers' / 'results.json').read_text())
  page = report.render(results, str(tmp_path))
  assert page == (REPO / 'docs' / 'benchmarks.md').read_text(), (
      'docs/benchmarks.md is stale: run python benchmarks/peers/report.py benchmarks/peers/results.json')
  assert sorted(p.name for p in (tmp_path / 'img').iterdir()) == sorted(
      p.name for p in (REPO / 'docs' / 'img').glob('peers_*.png'))
  # The correctness check ran and passed for every framework and policy before anything was timed.
  assert {key.split('/')[0] for key in results['grad_check']} >= {'raw_jax', 'blox', 'nnx_functional', 'equinox'}
  assert all(v <= 1.0 for v in results['grad_check'].values())
