"""Byte-level language modelling (Dai et al. 2019, "Transformer-XL", enwik8 in Table 2).

The vocabulary is the 256 byte values. The corpus (config.task.corpus) is either
  'stdlib'  the Python standard library's own source, an offline corpus on every machine: every
            *.py file under sysconfig's stdlib directory (site-packages, dist-packages and virtual
            environments excluded) in sorted relative-path order, each followed by a newline. It is
            gathered at first use and cached as train.bin, valid.bin and test.bin (raw uint8) in
            config.task.cache_dir ('' or unset: ~/.cache/efflong/bytes_lm/stdlib-<python version>);
  a path    a byte file: enwik8 (raw, 100M bytes), enwik8.zip (its single member is read), or any
            other file.
Split rule, by position: the first 90% of the bytes (rounded down) are train, the next 5% (rounded
down) valid, the rest test. On enwik8 this is the standard split: 90M, 5M, 5M bytes.

Rows are contiguous streams, as in Transformer-XL: with global batch size B and segment length T
(task.seq_len) a split is cut into B equal contiguous parts (the remainder dropped), and at step s
of a pass global row b holds inputs part_b[sT : sT + T] and targets part_b[sT + 1 : sT + T + 1],
so each batch continues every row's text where the previous batch left it. A pass is
floor((len(part) - 1) / T) steps; the train stream then wraps to the start of every part at once.
Batch field `reset` [b] bool is True on every row of a pass's first segment: a model carrying
memory across segments clears it there. Process p of P holds global rows p*B/P ... (p+1)*B/P - 1.

Batch s of a stream is a function of the corpus and s only: a grain iterator's state (an index) is
all a checkpoint needs to resume it.
"""

from __future__ import annotations

import math
import os
import pathlib
import platform
import sysconfig
import tempfile
import zipfile

import grain
import jax
import ml_collections
import numpy as np

from efflong import errors
from efflong.tasks import Metrics, local_batch_size, token_metrics

VOCAB_SIZE = 256
SPLITS = ('train', 'valid', 'test')
_EXCLUDED_DIRS = ('site-packages', 'dist-packages')


def split_bounds(n: int) -> dict[str, tuple[int, int]]:
  """{split: (start, end)} of n bytes: the first 90% train, the next 5% valid (both rounded down),
  the rest test."""
  train, valid = n * 90 // 100, n * 5 // 100
  return {'train': (0, train), 'valid': (train, train + valid), 'test': (train + valid, n)}


def stdlib_files(root: str) -> list[str]:
  """The *.py files under root, as sorted '/'-separated relative paths; directories named
  site-packages or dist-packages and virtual environments (holding a pyvenv.cfg) are skipped."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS
                   and not os.path.isfile(os.path.join(dirpath, d, 'pyvenv.cfg'))]
    rel = pathlib.PurePath(os.path.relpath(dirpath, root))
    found.extend((rel / f).as_posix() for f in filenames if f.endswith('.py'))
  return sorted(found)


def gather_stdlib(root: str) -> bytes:
  """The bytes of stdlib_files(root), concatenated in that order, each followed by a newline."""
  return b''.join(pathlib.Path(root, f).read_bytes() + b'\n' for f in stdlib_files(root))


def default_cache_dir() -> str:
  """~/.cache/efflong/bytes_lm/stdlib-<python version>: where the stdlib corpus is cached."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'efflong', 'bytes_lm',
                      f'stdlib-{platform.python_version()}')


def _write_atomically(path: str, data: np.ndarray) -> None:
  """Writes data to path through a temporary file in the same directory and os.replace."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.tobytes())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared data
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def stdlib_splits(cache_dir: str, root: str | None = None) -> dict[str, np.ndarray]:
  """{split: uint8 [n]} of the stdlib corpus under root (default sysconfig's stdlib), read-only
  memmaps of the cache in cache_dir, which is built first if any of its three files is missing."""
  paths = {s: os.path.join(cache_dir, f'{s}.bin') for s in SPLITS}
  if not all(os.path.isfile(p) for p in paths.values()):
    os.makedirs(cache_dir, exist_ok=True)
    data = np.frombuffer(gather_stdlib(root or sysconfig.get_paths()['stdlib']), np.uint8)
    for s, (start, end) in split_bounds(data.size).items():
      _write_atomically(paths[s], data[start:end])
  return {s: np.memmap(p, np.uint8, mode='r') for s, p in paths.items()}


def _check_file(path: str) -> None:
  """Raises a one-line ValueError if path is not a non-empty file (or a zip of one)."""
  if not os.path.isfile(path):
    raise errors.Error(f"task.corpus={path!r} does not exist; give 'stdlib' or a byte file "
                       '(enwik8, enwik8.zip or any file).')
  if path.endswith('.zip'):
    with zipfile.ZipFile(path) as z:
      members = z.infolist()
      if len(members) != 1:
        raise errors.Error(f'task.corpus={path!r} holds {len(members)} members; a corpus zip must '
                           'hold exactly one file.')
      size = members[0].file_size
  else:
    size = os.path.getsize(path)
  if size == 0:
    raise errors.Error(f'task.corpus={path!r} is empty; a corpus needs at least one byte.')


def file_splits(path: str) -> dict[str, np.ndarray]:
  """{split: uint8 [n]} of a byte file by split_bounds: views of a read-only memmap, or of the
  single member of a .zip read into memory."""
  _check_file(path)
  if path.endswith('.zip'):
    with zipfile.ZipFile(path) as z:
      data = np.frombuffer(z.read(z.infolist()[0]), np.uint8)
  else:
    data = np.memmap(path, np.uint8, mode='r')
  return {s: data[start:end] for s, (start, end) in split_bounds(data.size).items()}


def make_batch(data: np.ndarray, step: int, *, global_batch: int, seq_len: int, rows: range,
               steps_per_pass: int) -> dict[str, np.ndarray]:
  """Segment `step` of the contiguous-row stream of data (wrapping every steps_per_pass steps).

  Args:
    data: uint8 [n], the split's bytes.
    step: the batch index; step % steps_per_pass is its segment within the pass.
    global_batch: B, the number of equal contiguous parts data is cut into.
    seq_len: T.
    rows: the global rows this process holds.
    steps_per_pass: segments per pass; at most (n // B - 1) // T.
  Returns:
    inputs int32 [b, T], targets int32 [b, T] (inputs shifted by one), weights float32 [b, T]
    (ones), reset bool [b] (True on a pass's first segment), b = len(rows).
  """
  segment = step % steps_per_pass
  starts = np.asarray(rows) * (data.size // global_batch) + segment * seq_len
  window = np.asarray(data[starts[:, None] + np.arange(seq_len + 1)], np.int32)  # [b, T + 1]
  return {'inputs': window[:, :-1], 'targets': window[:, 1:],
          'weights': np.ones((len(rows), seq_len), np.float32),
          'reset': np.full(len(rows), segment == 0)}


class BytesLM:
  """Task object for config.task.name = 'bytes_lm' (fields: seq_len, vocab_size = 256, corpus,
  cache_dir). Train is endless (passes wrap); eval is config.eval.steps consecutive segments of the
  valid split with config.eval.batch_size rows, or every full segment if eval.steps is 0 or None."""

  contiguous_rows = True  # batch s + 1 continues each row of batch s (see the module docstring)

  def __init__(self, config: ml_collections.ConfigDict):
    self.seq_len, self.vocab_size = config.task.seq_len, config.task.vocab_size
    if self.vocab_size != VOCAB_SIZE:
      raise errors.Error(f'task.vocab_size={self.vocab_size} does not fit bytes: it must be 256.')
    if self.seq_len < 1:
      raise errors.Error(f'task.seq_len={self.seq_len} must be >= 1.')
    self.corpus = config.task.get('corpus', 'stdlib')
    self.cache_dir = config.task.get('cache_dir') or default_cache_dir()
    if self.corpus != 'stdlib':
      _check_file(self.corpus)
    self.train_batch, self.eval_batch = config.train.batch_size, config.eval.batch_size
    self.eval_steps = config.eval.get('steps') or 0
    self._splits: dict[str, np.ndarray] | None = None

  def split(self, name: str) -> np.ndarray:
    """uint8 [n]: the bytes of split name ('train', 'valid' or 'test'), loaded at first use."""
    if self._splits is None:
      self._splits = (stdlib_splits(self.cache_dir) if self.corpus == 'stdlib' else
                      file_splits(self.corpus))
    return self._splits[name]

  def _dataset(self, split: str, steps: int | None, batch: int, process_index: int,
               process_count: int) -> grain.IterDataset:
    """Contiguous-row batches of split: endless if steps is None, else the first `steps` segments
    of one pass (0: all of them)."""
    data = self.split(split)
    steps_per_pass = (data.size // batch - 1) // self.seq_len
    if steps_per_pass < 1:
      raise errors.Error(f'the {split} split of task.corpus={self.corpus!r} ({data.size} bytes) is '
                         f'too short for {batch} rows of seq_len + 1 = {self.seq_len + 1} bytes.')
    if steps is not None and steps > steps_per_pass:
      raise errors.Error(f'eval.steps={steps} exceeds the {steps_per_pass} full segments of the '
                         f'{split} split ({batch} rows of seq_len {self.seq_len}).')
    local = local_batch_size(batch, process_count)
    rows = range(process_index * local, (process_index + 1) * local)
    make = lambda s: make_batch(data, s, global_batch=batch, seq_len=self.seq_len, rows=rows,
                                steps_per_pass=steps_per_pass)
    size = 2**62 if steps is None else steps or steps_per_pass
    return grain.MapDataset.range(size).map(make).to_iter_dataset()

  def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    return self._dataset('train', None, self.train_batch, process_index, process_count)

  def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
    return self._dataset('valid', self.eval_steps, self.eval_batch, process_index, process_count)

  def target_weights(self, batch: dict) -> jax.Array:
    """[b, T]: batch['weights'] (every next byte is scored)."""
    return batch['weights']

  def loss_and_metrics(self, outputs: jax.Array, batch: dict) -> tuple[jax.Array, Metrics]:
    """token_metrics on logits [b, T, 256], plus bits_per_byte: the summed nll / ln 2."""
    loss, metrics = token_metrics(outputs, batch['targets'], self.target_weights(batch))
    nll_sum, count = metrics['loss']
    metrics['bits_per_byte'] = (nll_sum / math.log(2), count)
    return loss, metrics
