"""Docs are code: the pages' shell and Python blocks run as written (tests/doc_runner.py)."""

import pytest

from doc_runner import REPO, DocBlockError, blocks, run_page


def test_the_runner_catches_a_broken_block(tmp_path):
  page = tmp_path / 'page.md'
  page.write_text('Text.\n\n```python\n# file: mod.py\nVALUE = 3\n```\n\n```bash\npython -c "import mod; assert mod.VALUE == 3"\n```\n\n'
                  '```python\nx = 1\n```\n\n```python\nassert x == 2, x\n```\n\n'
                  '<!-- doc-test: skip needs a cluster -->\n```bash\nexit 7\n```\n')
  assert [b.skip for b in blocks(page)] == [None, None, None, None, 'needs a cluster']
  with pytest.raises(DocBlockError, match=r'page.md:\d+: the python block failed') as info:
    run_page(page, tmp_path)
  assert 'AssertionError: 1' in str(info.value)
  page.write_text(page.read_text().replace('x == 2', 'x == 1'))
  assert len(run_page(page, tmp_path)) == 4  # the skipped block is not run


@pytest.mark.slow
def test_custom_blocks_page_runs(tmp_path):
  ran = run_page(REPO / 'docs' / 'custom_blocks.md', tmp_path)
  assert sum(b.lang == 'bash' for b in ran) >= 4
  assert (tmp_path / 'runs' / 'parallel' / 'config.yaml').exists()
