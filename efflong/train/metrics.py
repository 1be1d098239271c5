"""Metric sums on the host, and the writers: metrics.jsonl, TensorBoard event files, a tqdm bar."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter


class Accumulator:
  """Adds up {name: (sum, count)} metrics across steps or batches; `means()` divides."""

  def __init__(self):
    self.sums: dict[str, list[float]] = {}

  def add(self, metrics: dict[str, tuple[Any, Any]]) -> None:
    for name, (total, count) in jax.device_get(metrics).items():
      acc = self.sums.setdefault(name, [0.0, 0.0])
      acc[0] += float(total)
      acc[1] += float(count)

  def means(self, prefix: str) -> dict[str, float]:
    return {f'{prefix}/{k}': s / c if c else float('nan') for k, (s, c) in self.sums.items()}


class Writer:
  """Writes one JSON object per logged step to metrics.jsonl and the same scalars to TensorBoard.

  Only process 0 writes; on other processes every method is a no-op.
  """

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True,
                         mininterval=1.0)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    row = {'step': step, **{k: float(v) for k, v in scalars.items()}}
    self.jsonl.write(json.dumps(row) + '\n')
    self.jsonl.flush()
    for k, v in scalars.items():
      if np.isfinite(v):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def progress(self, step: int, scalars: dict[str, float]) -> None:
    """Moves the bar to `step` and shows loss, accuracy and speed."""
    if not self.active:
      return
    shown = {'train/loss': 'loss', 'train/accuracy': 'acc', 'steps_per_sec': 'steps/s'}
    self.bar.set_postfix({short: f'{scalars[k]:.4g}' for k, short in shown.items() if k in scalars},
                         refresh=False)
    self.bar.update(step - self.bar.n)

  def message(self, text: str) -> None:
    if self.active:
      tqdm.tqdm.write(text)

  def close(self) -> None:
    if self.active:
      self.bar.close()
      self.tb.close()
      self.jsonl.close()
