"""Dense attention: blocked (efflong.attention.dense.blocked) against explicit (T x S).

One attention layer with its projections (efflong.nn.attention.Attention: batch 1, --heads heads
of --head_dim, model dim --d_model, float32), forward + backward w.r.t. its input and every
parameter, as issue 19 measures the families. Each (length, direction) runs in a fresh subprocess
so that its peak memory is its own: there every method (the explicit path up to --explicit_max,
the blocked path for each of --blocks) is compiled (XLA's temporary bytes recorded), run once
(a warm-up, left out when a single call is timed), then timed --reps times (--long_reps from
--long_from) interleaved (A, B, A, B, ...); the row reports the median wall and CPU milliseconds
of each and the process's peak resident memory (VmHWM, compilation included).

Command:
  ./launch.sh bench dense_blocked [--lengths=1024,4096,16384,65536] [--causal=false,true]
      [--blocks=256] [--reps=3] [--long_reps=1] [--long_from=16384] [--explicit_max=4096]
  (or .venv/bin/python experiments/bench/dense_blocked.py with the same flags)
Prints markdown; writes nothing.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import benchlib
from efflong.attention import Mask, dense
from efflong.nn.attention import Attention

_LENGTHS = flags.DEFINE_list('lengths', ['1024', '4096', '16384', '65536'], 'Sequence lengths T.')
_CAUSAL = flags.DEFINE_list('causal', ['false', 'true'], 'Directions: false, true or both.')
_BLOCKS = flags.DEFINE_list('blocks', [str(dense.BLOCK)], 'Block sizes of the blocked path.')
_REPS = flags.DEFINE_integer('reps', 3, 'Timed calls per method below --long_from.')
_LONG_REPS = flags.DEFINE_integer('long_reps', 1, 'Timed calls per method from --long_from.')
_LONG_FROM = flags.DEFINE_integer('long_from', 16384, 'Where --long_reps applies.')
_EXPLICIT_MAX = flags.DEFINE_integer('explicit_max', 4096, 'Longest T of the explicit path.')
_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Model dim D.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Heads N.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Head dim H.')
_TIMEOUT_S = flags.DEFINE_float('timeout_s', 3600, 'Per-(length, direction) time limit, seconds.')
_ONE = flags.DEFINE_string('one', None, 'Internal: measure this JSON spec, print its row as JSON.')


def blocked_attend(block: int) -> Callable[..., jax.Array]:
  """dense.attend's blocked path with blocks of `block` (attend picks it past dense.BLOCK only)."""

  def attend(q, k, v, *, mask: Mask):
    t, s = q.shape[1], k.shape[1]
    out, _ = dense.blocked(q, k, v, q_pos=jnp.arange(t)[None] + (s - t), causal=mask.causal,
                           scale=q.shape[3] ** -0.5, block=block)
    return out.astype(q.dtype)
  return attend


def build(attend: Callable[..., jax.Array], t: int, causal: bool) -> tuple[Callable[[], Any], int]:
  """The layer's jitted forward + backward at length t with `attend` as its core, and XLA's
  temporary bytes for it."""
  layer = Attention(_D_MODEL.value, _HEADS.value, _HEAD_DIM.value, causal=causal,
                    dtype=jnp.float32, rngs=nnx.Rngs(0))
  layer.attend = attend
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x, ct = (jnp.asarray(a) for a in
           np.random.default_rng(t).standard_normal((2, 1, t, _D_MODEL.value), np.float32))

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x, segment_ids=None) * ct)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return (lambda: jax.block_until_ready(compiled(params, x)),
          compiled.memory_analysis().temp_size_in_bytes)


def peak_mib() -> float:
  """The process's peak resident memory so far (VmHWM), MiB."""
  status = pathlib.Path('/proc/self/status').read_text()
  return int(re.search(r'VmHWM:\s+(\d+) kB', status)[1]) / 1024


def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """Times every method of spec (T, causal) interleaved in this process."""
  t, causal = spec['T'], spec['causal']
  methods = {f'blocked {c}': blocked_attend(int(c)) for c in spec['blocks']}
  if t <= spec['explicit_max']:
    methods = {'explicit': dense.reference, **methods}
  calls, row = {}, {'T': t, 'causal': causal, 'status': 'ok'}
  for name, attend in methods.items():
    calls[name], row[f'{name} temp MiB'] = build(attend, t, causal)
    row[f'{name} temp MiB'] /= 2**20
    if spec['reps'] > 1:
      calls[name]()  # Warm-up.
  times = {name: [] for name in calls}
  for _ in range(spec['reps']):
    for name, call in calls.items():
      wall, cpu = time.perf_counter(), time.process_time()
      call()
      times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
  for name, pairs in times.items():
    row[f'{name} ms'] = 1e3 * float(np.median([w for w, _ in pairs]))
    row[f'{name} cpu ms'] = 1e3 * float(np.median([c for _, c in pairs]))
  row['peak MiB'] = peak_mib()
  return row


def report(rows: list[dict[str, Any]], blocks: list[str]) -> list[str]:
  """Markdown: one line per (T, direction); explicit / blocked is the speed-up of blocked."""
  names = ['explicit'] + [f'blocked {c}' for c in blocks]
  lines = ['| T | causal | ' + ' | '.join(f'{n} ms (cpu ms), temp MiB' for n in names)
           + ' | explicit / blocked | peak MiB | status |',
           '|---:|---|' + '---:|' * len(names) + '---:|---:|---|']
  for row in rows:
    cells = [f"{row[f'{n} ms']:.0f} ({row[f'{n} cpu ms']:.0f}), {row[f'{n} temp MiB']:.1f}"
             if f'{n} ms' in row else '—' for n in names]
    ratio = (f"{row['explicit ms'] / row[f'blocked {blocks[0]} ms']:.2f}"
             if 'explicit ms' in row and f'blocked {blocks[0]} ms' in row else '—')
    peak = f"{row['peak MiB']:.0f}" if 'peak MiB' in row else '—'
    lines.append(f"| {row['T']} | {row['causal']} | {' | '.join(cells)} | {ratio} | {peak} "
                 f"| {row['status']} |")
  return lines


def main(argv: list[str]) -> None:
  del argv
  if _ONE.value:
    print(json.dumps(measure(json.loads(_ONE.value))))
    return
  rows = []
  for t in map(int, _LENGTHS.value):
    for causal in (c.lower() == 'true' for c in _CAUSAL.value):
      spec = dict(T=t, causal=causal, blocks=_BLOCKS.value, explicit_max=_EXPLICIT_MAX.value,
                  reps=_LONG_REPS.value if t >= _LONG_FROM.value else _REPS.value)
      flag_args = [f'--{f}={getattr(flags.FLAGS, f)}' for f in ('d_model', 'heads', 'head_dim')]
      row = benchlib.run_child(__file__, [*flag_args, f'--one={json.dumps(spec)}'],
                               {'T': t, 'causal': causal}, _TIMEOUT_S.value)
      print(json.dumps(row), file=sys.stderr, flush=True)
      rows.append(row)
  benchlib.emit(None, benchlib.header(jax.devices()[0].device_kind)
                + ['- layer: batch 1, D %d, N %d, H %d, float32, forward + backward'
                   % (_D_MODEL.value, _HEADS.value, _HEAD_DIM.value), '']
                + report(rows, _BLOCKS.value), rows)


if __name__ == '__main__':
  app.run(main)
