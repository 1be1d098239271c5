"""efflong's own errors: a config value, an input or a keyword that a user can fix, in one line.

`Error` (a ValueError) and `KeywordError` (a TypeError) are what efflong raises for its config and
inputs; the message names the value and what would be valid. The command line (efflong.main) shows
them, and `NonFiniteLossError`, as one line; every other exception keeps its traceback.

`check` makes such an error loud inside jit as well, where the values are only known when the
program runs.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import numpy as np


class Error(ValueError):
  """A config value or an input efflong cannot use; the message names it and what is valid."""


class KeywordError(TypeError):
  """An unknown (e.g. misspelled) keyword, such as an attention hyper-parameter."""


class CheckError(Error):
  """An Error that `check` found when a jitted program ran (its values were known only then)."""


def check(message: Callable[..., str | None], *values: jax.Array) -> None:
  """Raises CheckError(message(*values)) when message returns one, also when values are traced.

  Outside jit it raises at once. Under jit the check runs on the host when the program runs
  (jax.debug.callback: a copy of `values` to the host per call, so reduce them to a few scalars
  first), and its CheckError surfaces from the call (or the first blocking use of its results) as
  a jax.errors.JaxRuntimeError whose last line is the CheckError's; `one_line` recovers the
  message.

  Args:
    message: the values as numpy arrays -> an error message, or None when they are valid.
    *values: arrays, concrete or traced.
  """
  def callback(*concrete: np.ndarray) -> None:
    text = message(*(np.asarray(x) for x in concrete))
    if text is not None:
      raise CheckError(text)

  jax.debug.callback(callback, *values)


def one_line(e: BaseException) -> str | None:
  """The message of an efflong error, also of one raised inside a jitted program by `check`;
  None for any other exception."""
  if isinstance(e, (Error, KeywordError)):
    return str(e)
  if isinstance(e, jax.errors.JaxRuntimeError):
    # The callback's traceback, as text; its last line is '[module.]CheckError: <message>'.
    name, sep, message = (str(e).strip().splitlines() or [''])[-1].partition(': ')
    if sep and name.rsplit('.', 1)[-1] == CheckError.__name__:
      return message
  return None


class _DropCheckFailures(logging.Filter):
  """jax.debug.callback logs the traceback of a failing callback before re-raising it; a `check`
  failure is raised to the caller anyway, so its log record would only repeat it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], CheckError))


logging.getLogger('jax._src.debugging').addFilter(_DropCheckFailures())
