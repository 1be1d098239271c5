"""What the benchmarks under experiments/bench/ share: child processes and the report header."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
from flax import nnx


def run_child(script: str, args: list[str], row: dict[str, Any], timeout_s: float) -> dict[str, Any]:
  """Runs `python script *args` (which prints its row as JSON on its last stdout line); a failure
  becomes row + {'status': why}: a timeout, a kill (out of memory, most often) or an error."""
  try:
    child = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                           timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {**row, 'status': f'timed out after {timeout_s:g} s'}
  if child.returncode == 0:
    return json.loads(child.stdout.splitlines()[-1])
  if child.returncode < 0:
    return {**row, 'status': f'killed by signal {-child.returncode} (out of memory?)'}
  lines = [line for line in child.stderr.splitlines() if line.strip()] or ['no message']
  error = [line for line in lines if re.match(r'[\w.]+(Error|Exception)\b', line)] or lines
  return {**row, 'status': f'failed ({child.returncode}): {error[-1].replace("|", "/")[:200]}'}


def write(out: str, text: str, rows: list[dict[str, Any]]) -> pathlib.Path:
  """Writes <out>.md (text) and <out>.json (rows), making the folder; returns <out> as a Path."""
  path = pathlib.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.with_name(path.name + '.md').write_text(text)
  path.with_name(path.name + '.json').write_text(json.dumps(rows, indent=1))
  return path


def emit(out: str | None, lines: list[str], rows: list[dict[str, Any]]) -> None:
  """Prints the report's markdown lines and, when out is given, writes <out>.md and <out>.json."""
  text = '\n'.join(lines) + '\n'
  print(text)
  if out:
    write(out, text, rows)


def header(device: str) -> list[str]:
  """Markdown bullet lines: date, command, machine, device and versions."""
  return [
      f'- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}',
      f'- command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`',
      f'- machine: {platform.platform()}, {len(os.sched_getaffinity(0))} CPU cores available',
      f'- device: {device}',
      f'- versions: python {platform.python_version()}, jax {jax.__version__}, jaxlib '
      f'{jaxlib.__version__}, flax {flax.__version__}',
  ]


def layer_grad(layer: nnx.Module):
  """jit(grad) of sum(layer(x) * cot) with respect to every parameter and x: one attention layer's
  forward and backward, as the benchmarks time it. Called as fn(params, x, cot) with params the
  layer's nnx.Param state."""
  graph, _, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x, cot):
    out = nnx.merge(graph, params, rest)(x, segment_ids=None)
    return jnp.sum(out * cot)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))
