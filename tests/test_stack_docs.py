"""docs/stack.md: its Python examples run as written."""

import pathlib
import re

import numpy as np
import pytest


@pytest.mark.slow
def test_docs_examples_run():
  """The Python blocks of docs/stack.md run, in order, in one namespace."""
  text = (pathlib.Path(__file__).parent.parent / 'docs' / 'stack.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
  assert len(blocks) >= 4
  namespace: dict = {}
  for code in blocks:
    exec(compile(code, 'docs/stack.md', 'exec'), namespace)
  assert np.isfinite(float(namespace['loss']))
  assert namespace['caches'].shape == (4, 8, 32, 16)
