"""The package layering: what a module may import of efflong."""

import os
import subprocess
import sys


def loaded_after(statement: str) -> set[str]:
  """The efflong modules loaded by running `statement` in a fresh interpreter."""
  code = f'import sys; {statement}; print(*sorted(m for m in sys.modules if m.startswith("efflong")))'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          check=True)
  return set(result.stdout.split())


def test_kernels_load_no_attention_family():
  """The kernels build on the leaf efflong.mask, not on efflong.attention and its families."""
  loaded = loaded_after('import efflong.kernels.flash_attention, efflong.kernels.linear_attention')
  assert 'efflong.kernels.flash_attention' in loaded
  assert not {m for m in loaded if m.startswith(('efflong.attention', 'efflong.nn'))}, loaded
