"""efflong's own errors: a config value, an input or a keyword that a user can fix, in one line.

`Error` (a ValueError) and `KeywordError` (a TypeError) are what efflong raises for its config and
inputs; the message names the value and what would be valid. The command line (efflong.main) shows
them, and `NonFiniteLossError`, as one line; every other exception keeps its traceback.

`check` makes such an error loud inside jit as well, where the values are known only when the
program runs; `raise_pending` raises it on the host.
"""

from __future__ import annotations

import threading
from typing import Callable

import jax
import numpy as np
from absl import logging


class Error(ValueError):
  """A config value or an input efflong cannot use; the message names it and what is valid."""


class KeywordError(TypeError):
  """An unknown (e.g. misspelled) keyword, such as an attention hyper-parameter."""


class CheckError(Error):
  """An Error that `check` found when a jitted program ran (its values were known only then)."""


_failed: list[str] = []  # messages of the checks that failed in jitted programs, not yet raised
_lock = threading.Lock()  # callbacks run on XLA's threads, one per device


def check(message: Callable[..., str | None], *values: jax.Array,
          failed: jax.Array | None = None) -> None:
  """Raises CheckError(message(*values)) when message returns one, also when values are traced.

  With concrete values it raises at once. Traced (under jit), the check runs on the host when the
  program runs (jax.debug.callback: a copy of `values` to the host per device, so reduce them to a
  few scalars first): a failure is logged as an error at once and raised by the next
  `raise_pending` (the trainer calls it whenever it fetches a step's results, and after each
  evaluation). It is not raised inside the program: a device that stopped there would leave the
  others of a sharded program waiting for it in their next collective.

  Args:
    message: the values as numpy arrays -> an error message, or None when they are valid.
    *values: arrays, concrete or traced; every device must see the same values (reduce over the
      whole array, as jnp.max does under jit).
    failed: traced: a bool scalar, True when the values are invalid (what message says, computed
      on the device); the host is then called only when it is True (lax.cond), not at every run
      of the program, which a check in every training step would otherwise pay. None: the host
      judges every run.
  """
  evaluate = lambda *arrays: message(*(np.asarray(x) for x in arrays))
  if not any(isinstance(v, jax.core.Tracer) for v in values):
    text = evaluate(*values)
    if text is not None:
      raise CheckError(text)
    return

  def callback(*concrete: np.ndarray) -> None:
    text = evaluate(*concrete)
    with _lock:
      if text is None or text in _failed:
        return
      _failed.append(text)
    logging.error('efflong: a check failed inside a jitted program: %s', text)

  report = lambda *arrays: jax.debug.callback(callback, *arrays, partitioned=True)
  if failed is None:
    report(*values)
  else:
    jax.lax.cond(failed, report, lambda *arrays: None, *values)


def raise_pending() -> None:
  """Raises CheckError for the first `check` that failed inside a jitted program since the last
  call, after every dispatched program's callbacks ran (jax.effects_barrier); forgets the rest."""
  jax.effects_barrier()
  with _lock:
    failed = list(_failed)
    _failed.clear()
  if failed:
    more = f' ({len(failed) - 1} more failed checks are logged above)' if len(failed) > 1 else ''
    raise CheckError(failed[0] + more)
