"""kernels.resolve: 'auto' falling back to XLA on the GPU for a tile Triton cannot take says so."""

import jax
import pytest

from efflong import kernels


@pytest.fixture(name='warnings')
def _warnings(monkeypatch):
  """The warnings resolve logs during the test, starting with none remembered as given."""
  logged = []
  monkeypatch.setattr(kernels.logging, 'warning', logged.append)
  kernels._warn_once.cache_clear()  # pylint: disable=protected-access
  yield logged
  kernels._warn_once.cache_clear()  # pylint: disable=protected-access


def _on(monkeypatch, backend):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)


def test_auto_fallback_on_the_gpu_is_logged_once_per_tile(monkeypatch, warnings):
  _on(monkeypatch, 'gpu')
  assert [kernels.resolve('auto', tile=t) for t in (8, 8, 24, 8)] == ['xla'] * 4
  assert warnings == [
      f"attention_impl='auto' runs XLA, not the Pallas kernels, for tile {t}: Triton needs a power "
      "of two >= 16; set the family's block (LSH: bucket_size) to one to use the kernels."
      for t in (8, 24)]


@pytest.mark.parametrize('backend, impl, tile, want', [
    ('gpu', 'auto', 16, 'pallas'),     # the kernels run: nothing to say
    ('gpu', 'auto', None, 'pallas'),
    ('gpu', 'xla', 8, 'xla'),          # XLA was asked for
    ('cpu', 'auto', 8, 'xla'),         # 'auto' never picks Pallas off the GPU, whatever the tile
    ('tpu', 'auto', 8, 'xla'),
])
def test_no_warning_without_a_fallback_from_the_kernels(monkeypatch, warnings, backend, impl, tile,
                                                        want):
  _on(monkeypatch, backend)
  assert kernels.resolve(impl, tile=tile) == want
  assert not warnings
