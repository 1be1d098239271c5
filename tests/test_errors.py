"""errors.check: raised at once on concrete values; under jit logged when the program runs and
raised by errors.raise_pending, also from a program sharded over 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from efflong import errors

too_big = lambda high: f'id {int(high)} is above 2.' if high > 2 else None


@pytest.fixture(name='logged')
def _logged(monkeypatch):
  """The errors the checks log during the test; no failure is left pending after it."""
  lines = []
  monkeypatch.setattr(errors.logging, 'error', lambda fmt, *args: lines.append(fmt % args))
  yield lines
  errors.raise_pending()


def test_concrete_values_raise_at_once(logged):
  errors.check(too_big, np.int32(2))
  with pytest.raises(errors.CheckError, match=r'^id 3 is above 2\.$'):
    errors.check(too_big, np.int32(3))
  assert not logged


def test_a_sharded_jitted_program_logs_once_and_raise_pending_raises(logged):
  """Every device of the program runs the check; none stops there (the others would wait for it),
  the failure is logged once and raised on the host."""
  mesh = jax.make_mesh((8,), ('data',))
  ids = jax.device_put(jnp.arange(16) % 4, NamedSharding(mesh, P('data')))

  @jax.jit
  def step(ids):
    errors.check(too_big, jnp.max(ids))
    return ids * 2

  np.testing.assert_array_equal(step(ids), (np.arange(16) % 4) * 2)
  assert logged == ['efflong: a check failed inside a jitted program: id 3 is above 2.']
  with pytest.raises(errors.CheckError, match=r'^id 3 is above 2\.$'):
    errors.raise_pending()
  errors.raise_pending()  # raised once
  step(ids % 3)
  errors.raise_pending()  # valid values: nothing pending


def test_raise_pending_raises_the_first_failure_and_counts_the_others(logged):
  step = jax.jit(lambda x: errors.check(too_big, x))
  for high in (4, 3, 4, 5):
    step(jnp.int32(high))
  assert len(logged) == 3
  with pytest.raises(errors.CheckError,
                     match=r'^id 4 is above 2\. \(2 more failed checks are logged above\)$'):
    errors.raise_pending()


def test_with_a_failed_predicate_the_host_is_called_only_on_failure(logged):
  """failed= (computed on the device): valid values never reach the host, in a sharded program."""
  mesh = jax.make_mesh((8,), ('data',))
  calls = []

  def message(high):
    calls.append(int(high))
    return too_big(high)

  @jax.jit
  def step(ids):
    high = jnp.max(ids)
    errors.check(message, high, failed=high > 2)
    return ids

  ids = jax.device_put(jnp.arange(16) % 3, NamedSharding(mesh, P('data')))
  step(ids)
  errors.raise_pending()
  assert not calls  # valid: no host call at all
  step(ids + 1)
  with pytest.raises(errors.CheckError, match=r'^id 3 is above 2\.$'):
    errors.raise_pending()
  assert calls and logged == ['efflong: a check failed inside a jitted program: id 3 is above 2.']
