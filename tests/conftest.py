"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; one compilation cache."""

import os

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


@pytest.fixture(scope='session', autouse=True)
def _compilation_cache(tmp_path_factory):
  """A persistent compilation cache shared by this run's xdist workers: the trainer tests build the
  same smoke programs many times (a resumed run recompiles the straight run's step), and each then
  compiles once. It lives under pytest's base temp directory, so every run starts empty and pytest
  removes old ones."""
  import jax  # pylint: disable=g-import-not-at-top (after XLA_FLAGS above)
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # <basetemp>/popen-gwN: the workers share <basetemp>
  jax.config.update('jax_compilation_cache_dir', str(root / 'jax-cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
