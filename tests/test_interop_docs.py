"""docs/interop.md: its Python and shell blocks run as written, in order."""

import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_interop_doc_runs(tmp_path, monkeypatch):
  text = (ROOT / 'docs' / 'interop.md').read_text()
  blocks = re.findall(r'```(python|bash)\n(.*?)```', text, flags=re.S)
  assert [kind for kind, _ in blocks].count('bash') == 4
  monkeypatch.chdir(tmp_path)
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  namespace: dict = {}
  for kind, code in blocks:
    if kind == 'python':
      exec(compile(code, 'docs/interop.md', 'exec'), namespace)
    else:
      r = subprocess.run(code, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
      assert r.returncode == 0, f'{code}\n{r.stderr[-3000:]}'
  files = sorted(p.name for p in (tmp_path / 'runs/interop/tiny-hf').iterdir())
  assert files[:3] == ['config.json', 'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors']
  assert namespace['logits'].shape == (1, 4, 256)
