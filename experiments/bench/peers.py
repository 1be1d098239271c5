"""efflong's attention layer against its public PyTorch peers, side by side (issue 19).

Command:
  ./launch.sh bench peers [--lengths 1024,4096,16384] [--reps 7] [--budget_s 180]
      [--slow_s 20] [--max_call_s 150] [--memory_gib 12] [--out experiments/results/peers_cpu]
      [--rows linear,linformer,...]  (a subset of the table's rows, by key; default all)
  Dense at 64K (its memory goal), one call a side, written beside the table:
  ./launch.sh bench peers --rows dense --lengths 65536 --reps 1 --max_call_s 1200
      --out experiments/results/peers_cpu_dense64k

Measured as a new user would run it: ONE attention layer with its projections (batch 1, 4 heads,
head dim 64, model dim 256, float32), forward + backward with respect to the input and every
parameter of sum(out * ct), ct a fixed cotangent. efflong: jax.jit(jax.grad(loss, argnums=(0, 1)))
over (params, x) of efflong.nn.attention.Attention built as the models build it (the family's
config defaults updated with the row's hyper-parameters, the default model.attention_impl,
max_len = T). Peers: each package's public attention module (local-attention's core and torch
SDPA between nn.Linear q, k, v, o), out.backward(ct); each mapping is listed in the results file.

Per length, every method runs in this one process, interleaved: a warm-up call each, then rounds
in which each runs once, in a shuffled order (as many rounds as --budget_s allows, at least 3, at
most --reps); the median ms per method, the median of the per-round ratios peer / efflong per
family. Before that, a fresh subprocess per (method, T) builds (and compiles) it, resets the
kernel's peak-RSS mark (/proc/self/clear_refs), makes one call and reads VmHWM: the peak memory
the call added (XLA's memory analysis beside efflong's). A method slower than --slow_s there is not
called again (that call is its time); one whose time or memory extrapolated from the previous
length exceeds --max_call_s or --memory_gib, or whose XLA memory analysis does, is skipped, with
the reason.

Environment: .peers/venv, made on first use (remade when peers_requirements.txt or .venv's
versions change): the peers pinned there, torch 2.13.0 (the CPU wheel), and efflong (editable,
under .venv's versions: the same jax and flax); never a dependency of efflong. Started from .venv
(as launch.sh does), the script re-executes itself there with the glibc heap tuned for PyTorch
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=2^40); torch runs on as many threads as there are
cores. Writes <out>.md (machine, versions, command, the table, the issue's goals checked from the
numbers) and <out>.json (every number).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import pathlib
import platform
import random
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

_HERE = pathlib.Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
_VENV = _ROOT / '.peers' / 'venv'
_REQUIREMENTS = _HERE / 'peers_requirements.txt'
_HEAP = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2**40)}
_B, _N, _H, _D = 1, 4, 64, 256
_PACKAGES = ('torch', 'linear-attention-transformer', 'performer-pytorch', 'linformer',
             'reformer-pytorch', 'local-attention', 'jax', 'jaxlib', 'flax', 'numpy')
_GOAL_RATIO, _CAUSAL_RATIO, _DENSE_GIB, _DENSE_SDPA = 1.2, 10.0, 2.0, 1.5


def ensure_env() -> None:
  """Returns in .peers/venv with the heap tuned; elsewhere re-executes the calling script there,
  first making the venv when its stamp (a hash of the requirements and .venv's versions) is
  missing."""
  if pathlib.Path(sys.prefix).resolve() == _VENV and all(os.environ.get(k) == v
                                                         for k, v in _HEAP.items()):
    return
  pins = subprocess.run([_ROOT / '.venv' / 'bin' / 'python', '-m', 'pip', 'freeze',
                         '--exclude-editable'], check=True, capture_output=True, text=True).stdout
  digest = hashlib.sha256((_REQUIREMENTS.read_text() + pins).encode()).hexdigest()
  stamp = _VENV / f'.stamp-{digest[:16]}'
  if not stamp.exists():
    print(f'Setting up {_VENV} (torch and the peers; a few minutes)...', file=sys.stderr)
    subprocess.run([sys.executable, '-m', 'venv', _VENV], check=True)
    (_VENV / 'constraints.txt').write_text(pins)
    subprocess.run([_VENV / 'bin' / 'python', '-m', 'pip', 'install', '-q', '-e', _ROOT, '-r',
                    _REQUIREMENTS, '-c', _VENV / 'constraints.txt'], check=True)
    for old in _VENV.glob('.stamp-*'):
      old.unlink()
    stamp.touch()
  env = {**os.environ, **_HEAP}
  env.setdefault('PEERS_COMMAND', shlex.join(['./launch.sh', 'bench', 'peers', *sys.argv[1:]]))
  python = str(_VENV / 'bin' / 'python')
  os.execve(python, [python, os.path.abspath(sys.argv[0]), *sys.argv[1:]], env)  # The caller.


def projected(attend: Callable[..., Any]) -> Any:
  """A torch module: nn.Linear q, k, v, o (no bias, as efflong's) around attend(q, k, v) over
  [B, N, T, H], for a peer that is an attention core without projections."""
  import torch

  class Projected(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.q, self.k, self.v, self.o = (torch.nn.Linear(_D, _N * _H, bias=False) for _ in range(4))

    def forward(self, x):
      heads = lambda y: y.unflatten(-1, (_N, _H)).transpose(1, 2)
      out = attend(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
      return self.o(out.transpose(1, 2).flatten(2))

  return Projected()


@dataclasses.dataclass(frozen=True)
class Peer:
  """A public implementation: `path` 'module:attribute' in `package`, constructed with kw (the
  value 'T' stands for the length; kw None: the attribute is the attention function itself);
  core: it has no projections, so `projected` adds them."""
  package: str
  path: str
  kw: dict[str, Any] | None
  note: str
  core: bool = False

  def make(self, t: int) -> Any:
    module, name = self.path.split(':')
    peer = getattr(importlib.import_module(module), name)
    if name == 'mul':  # The floor row's core.
      peer = lambda q, k, v: q * k * v
    with contextlib.redirect_stdout(io.StringIO()):  # performer's causal layer: 'no CUDA code'.
      if self.kw is not None:
        peer = peer(**{k: t if v == 'T' else v for k, v in self.kw.items()})
    return projected(peer) if self.core else peer

  def describe(self) -> str:
    args = '' if self.kw is None else '(' + ', '.join(f'{k}={v}' for k, v in self.kw.items()) + ')'
    return f"{self.path.replace(':', '.')}{args}: {self.note}"


@dataclasses.dataclass(frozen=True)
class Row:
  """A family of the table: efflong's family, causal flag and hyper-parameters, and its peer."""
  key: str
  label: str
  family: str
  causal: bool
  kw: dict[str, Any]
  peer: Peer
  quadratic: bool = False  # Time grows as T^2 (extrapolating to the next length).
  floor: bool = False  # The projections alone (no goal): what any layer of the table costs.


_LAYER = dict(dim=_D, heads=_N, dim_head=_H)
_LAT = 'linear_attention_transformer.linear_attention_transformer:SelfAttention'
_LAT_NOTE = ("softmax(q) over features, {}; efflong's default feature map is elu + 1: another "
             'feature map, the same cost class')
_PERF_NOTE = 'FAVOR+ softmax kernel, orthogonal random features, fixed in a lone layer'
_LSH_NOTE = ('shared QK, its defaults otherwise: n_buckets T / 64, chunks of 64 and one look-back, '
             'attend_across_buckets=True, allow_duplicate_attention=True (no bucket mask nor '
             "duplicate count: less work than efflong's defaults), causal by position within the "
             "chunk window (efflong's causal_band=False form; efflong runs its default, the "
             'strictly causal band), attn_chunks=1 (no chunking)')
_PROJ_NOTE = 'between nn.Linear q, k, v, o (no bias); '
_ROWS = (
    Row('projections', 'projections only (q * k * v for the core)', 'dense', False, {}, Peer(
        'torch', 'torch:mul', None, _PROJ_NOTE + 'the core q * k * v (elementwise) on both sides: '
        "efflong's q, k, v, o modules of the layer without its attention", core=True), floor=True),
    Row('linear', 'linear, bidirectional', 'linear', False, {}, Peer(
        'linear-attention-transformer', _LAT, {**_LAYER, 'causal': False},
        _LAT_NOTE.format('softmax(k) over positions'))),
    Row('linear-causal', 'linear, causal', 'linear', True, {}, Peer(
        'linear-attention-transformer', _LAT, {**_LAYER, 'causal': True}, _LAT_NOTE.format(
            'exp(k); blindspot_size=1 (its default): a k^T v state per position, [T, 64, 64] per '
            'head, exact (a larger blindspot hides each bucket from itself: another model)'))),
    Row('performer', 'performer, bidirectional', 'performer', False, {'nb_features': 256}, Peer(
        'performer-pytorch', 'performer_pytorch:SelfAttention',
        {**_LAYER, 'nb_features': 256, 'causal': False}, _PERF_NOTE)),
    Row('performer-causal', 'performer, causal', 'performer', True, {'nb_features': 256}, Peer(
        'performer-pytorch', 'performer_pytorch:SelfAttention',
        {**_LAYER, 'nb_features': 256, 'causal': True}, _PERF_NOTE + '; causal on the CPU by its '
        "causal_linear_attention_noncuda (fast_transformers' CUDA kernel is absent): T in 128 "
        'pieces, a state [T / 128, 256, 64] per position of a piece and head')),
    Row('linformer', 'linformer k=256', 'linformer', False, {'k': 256, 'share': 'headwise'}, Peer(
        'linformer', 'linformer:LinformerSelfAttention', {**_LAYER, 'seq_len': 'T', 'k': 256},
        "E, F [T, 256] trained, one pair for all heads: efflong's share='headwise' (its default, "
        "'none', has a pair per head: more parameters, the same FLOPs)")),
    *(Row(f'lsh-{r}', f"lsh {r} round{'s' * (r > 1)}, causal, bucket 64", 'lsh', True,
          {'n_hashes': r, 'bucket_size': 64}, Peer(
              'reformer-pytorch', 'reformer_pytorch:LSHSelfAttention',
              {**_LAYER, 'bucket_size': 64, 'n_hashes': r, 'causal': True}, _LSH_NOTE))
      for r in (1, 4)),
    Row('local', 'local window 256, causal', 'local', True, {'window': 256}, Peer(
        'local-attention', 'local_attention:LocalAttention',
        {'window_size': 256, 'causal': True, 'exact_windowsize': True}, _PROJ_NOTE +
        "blocks of 256 see their block and the one before, masked to keys i-256..i: efflong's "
        'window=256; no rotary embedding (the package adds it only when given dim)', core=True)),
    Row('dense', 'dense, bidirectional', 'dense', False, {}, Peer(
        'torch SDPA', 'torch.nn.functional:scaled_dot_product_attention', None, _PROJ_NOTE +
        'bidirectional, scale 1/8; on the CPU a fused flash-style kernel, O(T) memory', core=True),
        quadratic=True),
)
_BY_KEY = {row.key: row for row in _ROWS}


def efflong_hyper(row: Row) -> dict[str, Any]:
  """The family's hyper-parameters as a model built from the config gets them."""
  from efflong import config as config_lib
  return {**config_lib.attention_defaults(row.family).to_dict(), **row.kw}


def build(method: str, t: int) -> tuple[Callable[[], None], int | None]:
  """The method's call (forward + backward) at length t and, for efflong, the bytes of XLA's
  memory analysis (arguments + outputs + temporaries). method: 'efflong:<key>' | 'peer:<key>'."""
  import numpy as np
  side, key = method.split(':')
  row = _BY_KEY[key]
  x_np, ct_np = np.random.default_rng(t).standard_normal((2, _B, t, _D), np.float32)
  if side == 'peer':
    import torch
    module, ct = row.peer.make(t), torch.from_numpy(ct_np)
    x = torch.from_numpy(x_np).requires_grad_()

    def step():
      module.zero_grad(set_to_none=True)
      x.grad = None
      module(x).backward(ct)
    return step, None
  import jax
  compiled, args = efflong_step(row, x_np, ct_np)
  mem = compiled.memory_analysis()
  xla = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
         + mem.temp_size_in_bytes)
  return lambda: jax.block_until_ready(compiled(*args)), xla


def efflong_step(row: Row, x_np: Any, ct_np: Any) -> tuple[Any, tuple[Any, ...]]:
  """efflong's side of a row: the compiled jit(grad) of sum(layer(x) * ct) w.r.t. (params, x),
  and its arguments (params, x, ct), for x, ct [B, T, D] numpy arrays."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from efflong import config as config_lib
  from efflong.nn.attention import Attention
  layer = Attention(_D, _N, _H, family=row.family, family_kw=efflong_hyper(row), causal=row.causal,
                    impl=config_lib.base('peers').model.attention_impl, max_len=x_np.shape[1],
                    stack_modules={}, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x, ct):
    layer = nnx.merge(graphdef, params, rest)
    out = (layer.o(layer.q(x) * layer.k(x) * layer.v(x)) if row.floor
           else layer(x, segment_ids=None))
    return jnp.sum(out * ct)

  args = (params, jnp.asarray(x_np), jnp.asarray(ct_np))
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile(), args


def _proc_kib(field: str) -> int:
  """A kB field of /proc/self/status (VmRSS, VmHWM, VmSize)."""
  return int(re.search(rf'{field}:\s+(\d+) kB', pathlib.Path('/proc/self/status').read_text())[1])


def _use_all_cores() -> None:
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))


def _call_ms(step: Callable[[], None]) -> float:
  start = time.perf_counter()
  step()
  return (time.perf_counter() - start) * 1e3


def probe(method: str, t: int, memory_gib: float) -> dict[str, Any]:
  """One call of method at t in this fresh process: its time and the resident memory it added
  (VmHWM after the call minus VmRSS after setup and compilation, the peak mark reset between)."""
  if method.startswith('peer:'):
    _use_all_cores()
  row: dict[str, Any] = {'method': method, 'T': t}
  step, xla = build(method, t)
  if xla is not None:
    row['xla_mib'] = xla / 2**20
    if xla > memory_gib * 2**30:
      return {**row, 'status': f"skipped: XLA's memory analysis {xla / 2**30:.1f} GiB > "
                                f'--memory_gib {memory_gib:g}'}
  # An address-space cap: too much memory fails this process, not the machine's OOM killer.
  cap = _proc_kib('VmSize') * 1024 + int(memory_gib * 2**30)
  resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
  pathlib.Path('/proc/self/clear_refs').write_text('5')
  base_kib = _proc_kib('VmRSS')
  call_ms = _call_ms(step)
  return {**row, 'status': 'ok', 'call_ms': call_ms,
          'peak_mib': (_proc_kib('VmHWM') - base_kib) / 1024}


def summarize(efflong_ms: list[float], peer_ms: list[float], paired: bool) -> dict[str, Any]:
  """Medians and peer / efflong: the median of the per-round ratios when the calls were paired
  (call i of each in round i), else the ratio of the medians."""
  eff, peer = statistics.median(efflong_ms), statistics.median(peer_ms)
  ratio = (statistics.median(p / e for e, p in zip(efflong_ms, peer_ms, strict=True)) if paired
           else peer / eff)
  return {'efflong_ms': eff, 'peer_ms': peer, 'ratio': ratio, 'paired': paired}


def _skip_reason(method: str, t: int, prev: dict[str, Any] | None, args) -> str | None:
  """Why method is not probed at t, judged from the previous length (None: probe it)."""
  if prev is None:
    return None
  if prev['status'] != 'ok':
    return f"skipped: not measured at T={prev['T']}"
  scale = t / prev['T']
  call_s = prev['median_ms'] / 1e3 * scale ** (2 if _BY_KEY[method.split(':')[1]].quadratic else 1)
  if call_s > args.max_call_s:
    return f"skipped: about {call_s:.0f} s a call (from T={prev['T']}) > --max_call_s"
  if method.startswith('peer:') and prev['peak_mib'] * scale > args.memory_gib * 1024:
    return f"skipped: about {prev['peak_mib'] * scale / 1024:.1f} GiB (from T={prev['T']})"
  return None


def measure_length(t: int, previous: dict[str, dict[str, Any]], args) -> dict[str, dict[str, Any]]:
  """Every method at length t: its probe (memory and one call), then the interleaved rounds."""
  import benchlib  # Here, not above: it imports jax, which a peer's probe need not load.
  methods = [f'{side}:{row.key}' for row in selected(args) for side in ('efflong', 'peer')]
  results = {}
  for m in methods:
    reason = _skip_reason(m, t, previous.get(m), args)
    print(f'T={t} {m}: {reason or "probing"}', file=sys.stderr, flush=True)
    results[m] = {'method': m, 'T': t, 'status': reason} if reason else benchlib.run_child(
        __file__, ['--probe', m, '--lengths', str(t), '--memory_gib', str(args.memory_gib)],
        {'method': m, 'T': t}, timeout_s=3 * args.max_call_s + 600)
  ok = [m for m in methods if results[m]['status'] == 'ok']
  for m in ok:
    if results[m]['call_ms'] > args.slow_s * 1e3:
      results[m].update(times_ms=[results[m]['call_ms']], note='one call (the memory probe)')
  timed = [m for m in ok if 'times_ms' not in results[m]]
  steps = {m: build(m, t)[0] for m in timed}
  warm_ms = {m: _call_ms(steps[m]) for m in timed}
  rounds = 0 if not timed else max(min(3, args.reps), min(args.reps, int(
      args.budget_s * 1e3 / sum(warm_ms.values()))))  # None timed: every method made one call.
  print(f'T={t}: {rounds} rounds of {len(timed)} methods', file=sys.stderr, flush=True)
  for m in timed:
    results[m].update(warmup_ms=warm_ms[m], times_ms=[])
  for r in range(rounds):
    order = list(timed)
    random.Random(f'{t}/{r}').shuffle(order)
    for m in order:
      results[m]['times_ms'].append(_call_ms(steps[m]))
  for m in ok:
    results[m]['median_ms'] = statistics.median(results[m]['times_ms'])
  return results


def selected(args) -> list[Row]:
  """The rows named by --rows (all when empty); an unknown key is an error naming the valid ones."""
  keys = [k for k in args.rows.split(',') if k] or list(_BY_KEY)
  unknown = sorted(set(keys) - set(_BY_KEY))
  if unknown:
    raise SystemExit(f'--rows {",".join(unknown)}: unknown; valid: {",".join(_BY_KEY)}')
  return [_BY_KEY[k] for k in keys]


def table_rows(results: dict[int, dict[str, dict[str, Any]]],
               rows_run: list[Row]) -> list[dict[str, Any]]:
  """One row per (family, T): both sides' medians and statuses, the ratio, the peak memory."""
  rows = []
  for t, by_method in results.items():
    for row in rows_run:
      eff, peer = by_method[f'efflong:{row.key}'], by_method[f'peer:{row.key}']
      out = {'family': row.label, 'key': row.key, 'T': t, 'package': row.peer.package,
             'efflong_status': eff['status'], 'peer_status': peer['status'],
             'efflong_ms': eff.get('median_ms'), 'peer_ms': peer.get('median_ms'),
             'efflong_peak_mib': eff.get('peak_mib'), 'efflong_xla_mib': eff.get('xla_mib'),
             'peer_peak_mib': peer.get('peak_mib'),
             'calls': f"{len(eff.get('times_ms', []))}/{len(peer.get('times_ms', []))}"}
      if 'median_ms' in eff and 'median_ms' in peer:
        out.update(summarize(eff['times_ms'], peer['times_ms'],
                             paired='note' not in eff and 'note' not in peer))
      rows.append(out)
  return rows


def _check(label: str, value: float | None, ok: Callable[[float], bool]) -> str:
  verdict = 'not measured' if value is None else 'PASS' if ok(value) else 'FAIL'
  return f'- {verdict}: {label}' + ('' if value is None else f' (measured {value:.2f})')


def goals(rows: list[dict[str, Any]]) -> list[str]:
  """The issue's goals ("Done when"), each checked against the table's numbers."""
  at = {(r['key'], r['T']): r for r in rows}
  lines = []
  for t in (4096, 16384):
    for row in _ROWS:
      if row.floor or row.key == 'dense':  # Dense has its own goals below.
        continue
      need = _CAUSAL_RATIO if row.key in ('linear-causal', 'performer-causal') else _GOAL_RATIO
      lines.append(_check(f'{row.label}, T={t}: peer / efflong >= {need:g}',
                          at.get((row.key, t), {}).get('ratio'), lambda v, n=need: v >= n))
  for t in (16384, 65536):
    mib = at.get(('dense', t), {}).get('efflong_peak_mib')
    lines.append(_check(f'dense, T={t}: efflong runs in <= {_DENSE_GIB:g} GiB (peak GiB)',
                        None if mib is None else mib / 1024, lambda v: v <= _DENSE_GIB))
  ratio = at.get(('dense', 16384), {}).get('ratio')
  lines.append(_check(f'dense, T=16384: efflong within {_DENSE_SDPA:g}x of torch SDPA (efflong / '
                      'SDPA)', None if ratio is None else 1 / ratio, lambda v: v <= _DENSE_SDPA))
  return lines


def header(args) -> dict[str, Any]:
  """Date, command, machine, versions, and what was measured and how."""
  import torch
  cpu = re.search(r'model name\s*:\s*(.+)', pathlib.Path('/proc/cpuinfo').read_text())
  mem = re.search(r'MemTotal:\s+(\d+) kB', pathlib.Path('/proc/meminfo').read_text())
  return {
      'date': f'{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}',
      'command': f"`{os.environ.get('PEERS_COMMAND', shlex.join(sys.argv))}`",
      'machine': f'{cpu[1] if cpu else platform.processor()}, {len(os.sched_getaffinity(0))} '
                 f'cores, {int(mem[1]) / 2**20:.0f} GiB memory, {platform.platform()}',
      'versions': f'python {platform.python_version()}, ' + ', '.join(
          f'{p} {importlib.metadata.version(p)}' for p in _PACKAGES),
      'environment': f'torch threads {torch.get_num_threads()}, '
                     + ' '.join(f'{k}={v}' for k, v in _HEAP.items()),
      'settings': ', '.join(f'--{k} {v}' for k, v in vars(args).items() if k != 'probe'),
      'what and how': ' '.join(__doc__.split('\n\n')[2:4]).replace('\n', ' '),
  }


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  """The markdown: header, the table, the goals, the peers and their mappings."""
  mib = lambda v: '—' if v is None else f'{v:.0f}'
  ms = lambda v, status: f'{v:.0f}' if v is not None else status.replace('|', '/')
  lines = ['# efflong and its public PyTorch peers: one attention layer, forward + backward, CPU '
           '(issue 19)', '', *(f'- {k}: {v}' for k, v in meta.items()), '',
           '| family | T | efflong ms | best peer ms (package) | peer / efflong | efflong peak MiB '
           '(XLA analysis) | peer peak MiB | calls efflong/peer |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    ratio = '—' if r.get('ratio') is None else f"{r['ratio']:.2f}{'' if r['paired'] else ' *'}"
    lines.append(f"| {r['family']} | {r['T']} | {ms(r['efflong_ms'], r['efflong_status'])} | "
                 f"{ms(r['peer_ms'], r['peer_status'])} ({r['package']}) | {ratio} | "
                 f"{mib(r['efflong_peak_mib'])} ({mib(r['efflong_xla_mib'])}) | "
                 f"{mib(r['peer_peak_mib'])} | {r['calls']} |")
  lines += ['', '\\* unpaired: one side was slower than --slow_s and made one call (its memory '
            'probe); the ratio of the medians.', '', '## Goals of issue 19, checked from the '
            'numbers above', '', *goals(rows), '', '## The peers and their hyper-parameters', '',
            *(f'- {row.label}: efflong {row.family!r} {efflong_hyper(row)}; peer '
              f'{row.peer.describe()}' for row in _ROWS)]
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', default='1024,4096,16384')
  parser.add_argument('--reps', type=int, default=7, help='most rounds per length')
  parser.add_argument('--budget_s', type=float, default=180,
                      help='rounds per length: as many as fit (at least 3, at most --reps)')
  parser.add_argument('--slow_s', type=float, default=20,
                      help='a method slower than this makes one call (its memory probe)')
  parser.add_argument('--max_call_s', type=float, default=150,
                      help='skip a method whose call would take longer (from the previous length)')
  parser.add_argument('--memory_gib', type=float, default=12,
                      help='skip (predicted) or stop (measured) a method needing more')
  parser.add_argument('--out', default='experiments/results/peers_cpu')
  parser.add_argument('--rows', default='', help='comma-separated row keys (default: every row)')
  parser.add_argument('--probe', help=argparse.SUPPRESS)  # Internal: one method's probe.
  args = parser.parse_args()
  selected(args)  # An unknown row fails before the environment is made.
  ensure_env()
  lengths = [int(t) for t in args.lengths.split(',')]
  if args.probe:
    print(json.dumps(probe(args.probe, lengths[0], args.memory_gib)))
    return
  _use_all_cores()
  start, load = time.perf_counter(), os.getloadavg()[0]
  results, previous = {}, {}
  for t in lengths:
    results[t] = previous = measure_length(t, previous, args)
  rows = table_rows(results, selected(args))
  meta = header(args) | {
      'wall time': f'{time.perf_counter() - start:.0f} s',
      'load average': f'{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (1 minute; '
                      'on a loaded machine torch suffers more than XLA: quote a quiet run)'}
  text = report(rows, meta)
  print(text)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_name(out.name + '.md').write_text(text)
  out.with_name(out.name + '.json').write_text(json.dumps(
      {'meta': meta, 'rows': rows, 'goals': goals(rows),
       'methods': {t: list(by.values()) for t, by in results.items()}}, indent=1))


if __name__ == '__main__':
  main()
