"""The package layering: what a module may import of efflong."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Modules that import nothing of efflong, shared by the layers above them.
LEAVES = ('efflong.errors', 'efflong.mask', 'efflong.params', 'efflong.sinusoids')
# Bottom to top: a module may import its own package, the packages below it and the leaves.
LAYERS = ('efflong.kernels', 'efflong.attention', 'efflong.nn', 'efflong.models')


def efflong_imports(path: pathlib.Path) -> set[str]:
  """The efflong modules (or packages) that the file at `path` imports, anywhere in it.

  A relative import is returned as '.' plus its module: efflong imports absolutely.
  """
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level:
      found.add('.' * node.level + (node.module or ''))
    elif isinstance(node, ast.ImportFrom) and node.module == 'efflong':
      found.update(f'efflong.{alias.name}' for alias in node.names)  # efflong.<a module>
    elif isinstance(node, ast.ImportFrom):
      found.add(node.module)
  return {name for name in found if name.startswith(('efflong.', '.'))}


def within(name: str, modules: tuple[str, ...]) -> bool:
  return any(name == m or name.startswith(m + '.') for m in modules)


def files(module: str) -> list[pathlib.Path]:
  """The source files of a package, or of a module (none if it does not exist)."""
  path = ROOT / module.replace('.', '/')
  return sorted(path.rglob('*.py')) if path.is_dir() else list(path.parent.glob(path.name + '.py'))


@pytest.mark.parametrize('layer', LAYERS)
def test_layers_import_only_downwards(layer):
  allowed = LEAVES + LAYERS[:LAYERS.index(layer) + 1]
  paths = files(layer)
  assert paths
  upward = {f'{p.relative_to(ROOT)} imports {name}' for p in paths for name in efflong_imports(p)
            if not within(name, allowed)}
  assert not upward, sorted(upward)


def test_leaves_import_nothing_of_efflong():
  """Nothing but efflong.errors (their error type), which itself imports nothing of efflong."""
  paths = [p for leaf in LEAVES for p in files(leaf)]
  assert paths
  imports = {f'{p.relative_to(ROOT)} imports {name}' for p in paths for name in efflong_imports(p)
             if name != 'efflong.errors' or p == ROOT / 'efflong' / 'errors.py'}
  assert not imports, sorted(imports)


def test_import_parser_sees_every_form(tmp_path):
  source = tmp_path / 'x.py'
  source.write_text('import efflong.nn.blocks\nfrom efflong import models\nfrom efflong.train '
                    'import trainer\nfrom ..tasks import bytes_lm\nimport numpy, efflongish\n'
                    'def f():\n  from efflong.sweep import main\n')
  assert efflong_imports(source) == {'efflong.nn.blocks', 'efflong.models', 'efflong.train',
                                     '..tasks', 'efflong.sweep'}


def loaded_after(statement: str) -> set[str]:
  """The efflong modules loaded by running `statement` in a fresh interpreter."""
  code = f'import sys; {statement}; print(*(m for m in sys.modules if m.startswith("efflong")))'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          check=True, cwd=ROOT)
  return set(result.stdout.split())


def test_kernels_load_no_attention_family():
  """The kernels build on the leaf efflong.mask, not on efflong.attention and its families."""
  loaded = loaded_after('import efflong.kernels.flash_attention, efflong.kernels.linear_attention')
  assert 'efflong.kernels.flash_attention' in loaded
  assert not {m for m in loaded if m.startswith(('efflong.attention', 'efflong.nn'))}, loaded


def test_attention_loads_no_layer_above_it():
  """The families' modules build on efflong.params and efflong.sinusoids, not on efflong.nn."""
  loaded = loaded_after('import efflong.attention')
  assert 'efflong.attention.relative' in loaded
  assert not {m for m in loaded if within(m, ('efflong.nn', 'efflong.models', 'efflong.train'))}
