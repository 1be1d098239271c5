"""LRA Pathfinder and Path-X: are the two marked endpoints joined by one dashed contour?

The task (Linsley et al. 2018, "Learning long-range spatial dependencies with horizontal gated
recurrent units"; Kim et al. 2020, "Disentangling neural mechanisms for perceptual grouping"; used
as LRA's Pathfinder and Path-X, Tay et al. 2020 Sec. 3): a grayscale image holds contours made of
short straight dashes ("paddles") separated by gaps, each turning by a bounded angle from paddle to
paddle, and two markers (disks). Label 1: both markers sit on the ends of one contour; label 0: they
sit on two different contours. Pixels are the tokens (VOCAB_SIZE 256), rows of the image in order
(resolution**2 tokens: 1024 for Pathfinder-32, 16384 for Path-X at 128).

The generator (`generate`) follows the original's design (github.com/drewlinsley/pathfinder,
snakes2.py, with LRA's settings per resolution from LRA's lra_benchmarks/data/pathfinder.py):
  - Two target contours of `contour_length` paddles grow from origins `seed_distance` apart near the
    image centre, one paddle each in turn. Label 1 marks the origin and the far end of the same
    contour; label 0 marks the origin of one and the far end of the other. Both classes thus hold
    the same two long contours, with markers about as far apart: neither the count of contours nor
    the markers' distance gives the label away.
  - Distractors: contour_length // 3 paddles each, as many as LRA's paddle budget allows (32: 20
    paddles, so 5 distractors of 4 paddles at contour length 14; 64: 22; 128: 35; 256: 30).
  - Each paddle turns from the previous one by delta, |delta| < pi / (2 continuity): among _TURNS
    candidate turns (one per equal bin, jittered) it draws one of those that fit, weighted by
    cos(continuity * delta)^2, as the original weights the free candidate heads on a circle. A
    contour that finds none fails; a failed target pair is redrawn from scratch.
  - Contours never come within the link radius J = floor(gap) + 1 pixels (Chebyshev) of each
    other, nor cross themselves, and consecutive paddles of a contour are at most J apart. So a flood
    fill over the nonzero pixels that links pixels up to J apart (a (2J+1)^2 neighbourhood) finds
    exactly the contours: it joins the two markers exactly when the label is 1.
Differences from the original: no anti-aliasing (every drawn pixel is 255, the background 0), so
lines are 1 pixel wide at 32 and 64 and 2 at 128 and 256, markers are plain disks (3x3 at 32), and
the gap at 32 is 1.5 pixels (margin 1 with anti-aliasing) so that it survives rounding; the
candidate turns are jittered bins, not the pixels on a circle; a paddle starts a gap after the
previous one ends (the original pivots on a point a margin behind its end); contours keep a
clearance of J pixels (the original's dilated mask: about the margin); distractors that do not fit
in _TRIES placements are left out (as the original's allow_incomplete); no single-paddle
distractors (LRA's runs had none either) and no segmentation variant.

Example i of a split is a function of (seed, split, i) only (its own numpy random stream), so a
split can be generated in parallel or resumed; images are generated _CHUNK at a time, vectorised
over the batch (about 300 Pathfinder-32 images/s on one busy core). Labels alternate (even index 1, odd index 0): every split is
balanced exactly (to one example when its size is odd).

Task fields (task.<name>, default):
  resolution      32       image side: 32 (Pathfinder), 64, 128 (Path-X), 256; LRA's settings each.
  contour_length  14       paddles per target contour: 6 / 9 / 14 = easy / intermediate / hard
                           (LRA uses 14, 'curv_contour_length_14'); at least 3.
  num_train       160000   LRA: 200K images per difficulty split 80% / 10% / 10%,
  num_valid       20000      i.e. 160K / 20K / 20K.
  num_test        20000
  seed            0        generation only.
  source_dir      ''       '' = generate; else the released data's root (lra_release/): the reader
                           takes <source_dir>/pathfinder<resolution>/<difficulty>/metadata/*.npy
                           (text lines 'imgs/<k> sample_<i>.png <i> <label> ...': column 0 the
                           folder, 1 the file, 3 the label, as LRA's builder reads them) and the
                           PNGs imgs/<k>/sample_<i>.png; <difficulty> is curv_baseline,
                           curv_contour_length_9 or curv_contour_length_14 for contour_length 6, 9,
                           14. All rows in file order (metadata files by number), then the first
                           80% train, the next 10% validation, the rest test (LRA takes the same
                           percentages of its TFDS split, whose order is tfds's, not the files').
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
from typing import Any, Iterator, NamedTuple, Sequence

import ml_collections
import numpy as np

from efflong import errors

VOCAB_SIZE = 256
NUM_CLASSES = 2
VERSION = '1.0.0'
SPLITS = ('train', 'validation', 'test')
DEFAULTS = {'resolution': 32, 'contour_length': 14, 'num_train': 160_000, 'num_valid': 20_000,
            'num_test': 20_000, 'seed': 0, 'source_dir': ''}
FEATURES = {'inputs': ((None,), np.uint8), 'label': ((), np.int32)}  # the builder reads int32
DIFFICULTY_DIRS = {6: 'curv_baseline', 9: 'curv_contour_length_9', 14: 'curv_contour_length_14'}
_PAD = 1  # pixels left empty along the border (LRA's padding = 1)
_MARGIN = 8  # the grids' extra border (wall), wider than any box or disk reaches
_TURNS = 9  # candidate turns per paddle: one in each of 9 equal bins of (-1, 1), jittered
_ATTEMPTS = 200  # target pairs tried per image before the settings are declared impossible
_TRIES = 4  # placements tried per distractor (the original's max_distractor_contour_retrial)
_PARALLEL = 4  # attempts per image tried at once
_CHUNK = 256  # images generated together by examples()


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Drawing settings of one resolution, in pixels (LRA's args in brackets where they differ)."""
  paddle_length: float
  gap: float  # between consecutive paddles of a contour [paddle_margin]
  brush: int  # side of the square stamped along a paddle [paddle_thickness, anti-aliased]
  marker_radius: float
  seed_distance: float  # between the two targets' origins
  continuity: float  # turn sharpness: |turn| < pi / (2 continuity)
  distractor_paddles: int  # paddle budget of the distractors [num_distractor_snakes * length]

  @property
  def link_radius(self) -> int:
    """J: consecutive paddles of a contour are at most J pixels apart (Chebyshev), contours more."""
    return math.floor(self.gap) + 1


# LRA's lra_benchmarks/data/pathfinder.py, per resolution: paddle_length (2 at 32, the default 5
# elsewhere), paddle_margin (1; 1; 2 or 3; 3), thickness, marker radius, seed distance (7, 12, 20,
# the default 27), continuity, distractor paddle budget (20, 22, 35, 30).
GEOMETRIES = {
    32: Geometry(2., 1.5, 1, 1.5, 7., 1.0, 20),
    64: Geometry(5., 1.5, 1, 2.5, 12., 1.8, 22),
    128: Geometry(5., 2.5, 2, 3., 20., 1.8, 35),
    256: Geometry(5., 3., 2, 5., 27., 1.8, 30),
}


def _offsets(radius: float, square: bool, width: int) -> np.ndarray:
  """[Q] flat offsets dy * width + dx of the box (square) or disk of that radius."""
  r = math.floor(radius)
  dy, dx = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing='ij')
  keep = np.ones_like(dy, bool) if square else dy ** 2 + dx ** 2 <= radius * radius
  return (dy * width + dx)[keep]


def _direction(theta: np.ndarray) -> np.ndarray:
  """[..., 2] unit (dy, dx) of angles [...]."""
  return np.stack([np.sin(theta), np.cos(theta)], -1)


class _Contours:
  """One contour per row (image attempt), all grown one paddle at a time in step.

  Grids are [n, G * G] bool, row-major G x G with G = R + 2 _MARGIN: the image and a wall around it.
  zone: pixels within J of the contour (its reserved marker disks too), which other contours must
  not touch. own: pixels within 1 of its paddles but the newest, which its next paddle must not
  touch (no self-crossing). ink: its drawn pixels.
  """

  def __init__(self, gen: '_Generator', n: int):
    self.gen = gen
    self.zone, self.own, self.ink = (np.zeros((n, gen.size ** 2), bool) for _ in range(3))
    self.last = np.zeros((n, gen.paddle_size), np.int64)  # the newest paddle's flat pixels
    self.heading = np.zeros(n)
    self.turn = np.zeros((n, 2))  # centreline point where the next paddle turns (a half gap on)
    self.origin = np.zeros((n, 2))
    self.end = np.zeros((n, 2))

  def commit(self, rows: np.ndarray, pixels: np.ndarray, disks: np.ndarray, theta: np.ndarray,
             end: np.ndarray, first: bool) -> None:
    """Adds paddles [r, P] (and reserved disks [r, D]) along theta [r] ending at end [r, 2]."""
    gen = self.gen
    if not first:
      gen.mark(self.own, rows, self.last[rows], gen.box1)
    gen.mark(self.zone, rows, np.concatenate([pixels, disks], 1), gen.box_link)
    gen.mark(self.ink, rows, pixels, gen.box0)
    self.last[rows] = pixels
    self.heading[rows] = theta
    self.end[rows] = end
    self.turn[rows] = end + gen.geo.gap / 2 * _direction(theta)

  def seed(self, rows: np.ndarray, origin: np.ndarray, theta: np.ndarray, avoid: np.ndarray,
           reserve: bool) -> np.ndarray:
    """First paddles from origin [r, 2] along theta [r] (with the origin's disk if reserve): the
    rows [r] bool where they fit and were placed."""
    gen = self.gen
    pixels = gen.paddle(origin, theta)
    disks = gen.disk(origin) if reserve else pixels[:, :0]
    ok = ~(gen.hit(rows, pixels, avoid) | gen.hit(rows, disks, avoid))
    end = origin + gen.geo.paddle_length * _direction(theta)
    self.origin[rows[ok]] = origin[ok]
    self.commit(rows[ok], pixels[ok], disks[ok], theta[ok], end[ok], True)
    return ok

  def extend(self, rows: np.ndarray, avoid: np.ndarray, jitter: np.ndarray, pick: np.ndarray,
             reserve: bool) -> np.ndarray:
    """The next paddle of each row, a gap after the last: among _TURNS candidate turns, one drawn
    with weights cos(continuity * turn)^2 over those that fit (the original's weighting of the free
    candidates). jitter, pick: [r] uniforms. reserve: the new end's disk must fit too. Returns the
    rows [r] bool where a paddle was placed."""
    gen = self.gen
    v = gen.bins + (jitter[:, None] - .5) * gen.bin_width  # [r, K] in (-1, 1)
    theta = self.heading[rows, None] + np.pi / (2 * gen.geo.continuity) * v
    d = _direction(theta)
    start = self.turn[rows, None, :] + gen.geo.gap / 2 * d
    end = start + gen.geo.paddle_length * d
    pixels = gen.paddle(start, theta)  # [r, K, P]
    hit = gen.hit(rows, pixels, avoid, self.own)
    if reserve:
      hit |= gen.hit(rows, gen.disk(end), avoid)
    weight = np.where(hit, 0., np.cos(np.pi / 2 * v) ** 2)
    total = weight.sum(1)
    ok = total > 0
    k = np.argmax(np.cumsum(weight, 1) > (pick * total)[:, None], 1)
    i = np.arange(len(rows))
    pixels, end, theta = pixels[i, k], end[i, k], theta[i, k]
    disks = gen.disk(end) if reserve else pixels[:, :0]
    self.commit(rows[ok], pixels[ok], disks[ok], theta[ok], end[ok], False)
    return ok


class _Generator:
  """Pathfinder images of one resolution and contour length, many at a time."""

  def __init__(self, resolution: int, contour_length: int):
    self.res = resolution
    self.geo = geo = _geometry(resolution)
    _check_length(contour_length)
    self.length = contour_length
    self.short = max(contour_length // 3, 1)
    self.quota = geo.distractor_paddles // self.short
    self.size = size = resolution + 2 * _MARGIN
    inner = slice(_MARGIN + _PAD, _MARGIN + resolution - _PAD)
    wall = np.ones((size, size), bool)
    wall[inner, inner] = False
    self.wall = wall.reshape(-1)
    samples = math.ceil(2 * geo.paddle_length) + 1  # <= 0.5 px apart along a paddle
    self.along = np.linspace(0., geo.paddle_length, samples)
    self.brush = (np.arange(geo.brush)[:, None] * size + np.arange(geo.brush)).ravel()
    self.paddle_size = samples * len(self.brush)
    self.disk_offsets = _offsets(geo.marker_radius, False, size)
    self.box0, self.box1 = _offsets(0, True, size), _offsets(1, True, size)
    self.box_link = _offsets(geo.link_radius, True, size)
    self.bin_width = 2. / _TURNS
    self.bins = -1. + self.bin_width * (np.arange(_TURNS) + .5)
    # Uniforms per attempt: the pair's origins and first directions (5), two per paddle added to
    # each target, which target holds the origin marker (1); per distractor try: origin and
    # direction (3), two per paddle added.
    self.tries = _TRIES * self.quota
    self.swap_column = 5 + 4 * (contour_length - 1)
    self.uniforms = self.swap_column + 1 + self.tries * (3 + 2 * (self.short - 1))

  def paddle(self, start: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """[..., P] flat grid pixels of paddles from start [..., 2] along theta [...]."""
    points = start[..., None, :] + self.along[:, None] * _direction(theta)[..., None, :]
    centres = np.clip(np.floor(points + .5).astype(np.int64) + _MARGIN, 1, self.size - 2)
    flat = centres[..., 0] * self.size + centres[..., 1]
    return (flat[..., None] + self.brush).reshape(*flat.shape[:-1], self.paddle_size)

  def disk(self, centre: np.ndarray) -> np.ndarray:
    """[..., D] flat grid pixels of the marker disks at centre [..., 2]."""
    c = np.clip(np.floor(centre + .5).astype(np.int64) + _MARGIN, _MARGIN, self.size - 1 - _MARGIN)
    return (c[..., 0] * self.size + c[..., 1])[..., None] + self.disk_offsets

  def hit(self, rows: np.ndarray, pixels: np.ndarray, *grids: np.ndarray) -> np.ndarray:
    """[r, ...] whether any of pixels [r, ..., P] (of row rows[r]) is in the wall or a grid."""
    hit = self.wall[pixels]
    at = pixels + (rows * self.size ** 2).reshape(-1, *[1] * (pixels.ndim - 1))
    for grid in grids:
      hit |= grid.reshape(-1)[at]
    return hit.any(-1)

  def mark(self, grid: np.ndarray, rows: np.ndarray, pixels: np.ndarray, box: np.ndarray) -> None:
    """Sets grid[rows[r]] on the box around every pixel of pixels [r, P]."""
    at = (rows * self.size ** 2)[:, None, None] + pixels[:, :, None] + box
    grid.reshape(-1)[at] = True

  def targets(self, u: np.ndarray) -> tuple[np.ndarray, _Contours, _Contours]:
    """The two target contours of each attempt ([n, uniforms] u): (ok [n], a, b)."""
    n, geo = len(u), self.geo
    a, b = _Contours(self, n), _Contours(self, n)
    low, high = 2 * geo.seed_distance, self.res - 2 * geo.seed_distance  # the original's window
    origin_a = low + (high - low) * u[:, 0:2]
    origin_b = origin_a + geo.seed_distance * _direction(2 * np.pi * u[:, 2])
    rows = np.arange(n)
    ok = a.seed(rows, origin_a, 2 * np.pi * u[:, 3], b.zone, True)
    ok[ok] = b.seed(rows[ok], origin_b[ok], 2 * np.pi * u[ok, 4], a.zone, True)
    col = 5
    for k in range(1, self.length):
      for grow, other in ((a, b), (b, a)):
        rows = np.flatnonzero(ok)
        ok[rows] = grow.extend(rows, other.zone, u[rows, col], u[rows, col + 1],
                               k == self.length - 1)
        col += 2
    return ok, a, b

  def distractors(self, ids: np.ndarray, blocked: np.ndarray, u: np.ndarray) -> None:
    """Adds up to self.quota contours of self.short paddles to each image, as ids 3, 4, ... in
    ids [n, G * G], clear of blocked [n, G * G] and of each other; _TRIES placements each (the
    original gives up on a distractor as well). u: [n, tries * (3 + 2 (short - 1))] uniforms."""
    n, res = len(u), self.res
    count = np.zeros(n, np.int64)
    per_try = 3 + 2 * (self.short - 1)
    for t in range(self.tries):
      rows = np.flatnonzero(count < self.quota)
      if not len(rows):
        break
      v = u[rows, t * per_try:(t + 1) * per_try]
      contour = _Contours(self, n)
      origin = _PAD + (res - 2 * _PAD) * v[:, 0:2]
      ok = contour.seed(rows, origin, 2 * np.pi * v[:, 2], blocked, False)
      for k in range(1, self.short):
        ok[ok] = contour.extend(rows[ok], blocked, v[ok, 1 + 2 * k], v[ok, 2 + 2 * k], False)
      rows = rows[ok]
      blocked[rows] |= contour.zone[rows]
      ids[rows] = np.where(contour.ink[rows], (3 + count[rows])[:, None], ids[rows])
      count[rows] += 1

  def generate(self, seed: int, split: str,
               indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Examples `indices` [n] of `split` (the fields of Examples), each from its own random stream
    (seed, split, index): round t of an image takes its next _PARALLEL blocks of uniforms, tried at
    once, and keeps the first attempt whose targets fit, so batching does not change an image."""
    n, res, m = len(indices), self.res, _PARALLEL
    streams = [np.random.default_rng([seed, SPLITS.index(split), int(i)]) for i in indices]
    ids = np.zeros((n, self.size ** 2), np.int32)
    markers = np.zeros((n, 2, 2))
    labels = (1 - np.asarray(indices, np.int64) % 2).astype(np.int32)
    pending = np.arange(n)
    for _ in range(_ATTEMPTS // m):
      u = np.concatenate([streams[i].random((m, self.uniforms)) for i in pending])
      ok, a, b = self.targets(u)
      fits = ok.reshape(-1, m)
      got = fits.any(1)
      rows = np.flatnonzero(got) * m + np.argmax(fits[got], 1)  # the first attempt that fits
      done = pending[got]
      swap = u[rows, self.swap_column] < .5  # b holds the origin marker
      pick = lambda x, y: np.where(swap.reshape(-1, *[1] * (x.ndim - 1)), y[rows], x[rows])
      image_ids = np.where(pick(a.ink, b.ink), 1, np.where(pick(b.ink, a.ink), 2, 0))
      self.distractors(image_ids, a.zone[rows] | b.zone[rows], u[rows, self.swap_column + 1:])
      ids[done] = image_ids
      markers[done, 0] = pick(a.origin, b.origin)
      markers[done, 1] = np.where(labels[done, None] == 1, pick(a.end, b.end), pick(b.end, a.end))
      pending = pending[~got]
      if not len(pending):
        break
    else:
      raise errors.Error(f'contour_length={self.length} does not fit a {res}x{res} image: no two '
                         f'target contours placed in {_ATTEMPTS} attempts; try 6, 9 or 14.')
    ids = np.ascontiguousarray(
        ids.reshape(n, self.size, self.size)[:, _MARGIN:_MARGIN + res, _MARGIN:_MARGIN + res])
    centres = np.floor(markers + .5).astype(np.int64)
    disk = _offsets(self.geo.marker_radius, False, res)
    flat = (centres[..., 0] * res + centres[..., 1])[..., None] + disk  # [n, 2, D]
    owner = np.stack([np.ones(n, np.int32), np.where(labels == 1, 1, 2)], 1)
    ids.reshape(n, -1)[np.arange(n)[:, None, None], flat] = owner[:, :, None]
    return np.where(ids > 0, 255, 0).astype(np.uint8), labels, ids, centres


class Examples(NamedTuple):
  """Generated examples: images uint8 [n, R, R] (0 background, 255 drawn), labels int32 [n],
  contour ids int32 [n, R, R] (0 background, 1 the contour of the first marker, 2 the other
  target, 3.. distractors; marker disks take their contour's id), markers int64 [n, 2, 2] ((y, x)
  of each marker's centre pixel: the first on a target's origin, the second on the end of the same
  target when the label is 1, of the other when it is 0)."""
  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray
  markers: np.ndarray


@functools.lru_cache(maxsize=8)
def _generator(resolution: int, contour_length: int) -> _Generator:
  return _Generator(resolution, contour_length)


def generate(resolution: int, contour_length: int, seed: int, split: str,
             indices: Sequence[int]) -> Examples:
  """Examples `indices` of `split`; each is a function of (seed, split, index) and the settings
  only, whatever else is generated with it.

  Args:
    resolution: image side R, a key of GEOMETRIES (32, 64, 128 (Path-X), 256).
    contour_length: paddles per target contour (>= 3); distractors have contour_length // 3.
    seed: the data's seed.
    split: one of SPLITS.
    indices: [n] example indices (>= 0).
  """
  if split not in SPLITS:
    raise errors.Error(f'split={split!r} is not a Pathfinder split; valid: {", ".join(SPLITS)}.')
  return Examples(*_generator(resolution, contour_length).generate(seed, split, indices))


def _geometry(resolution: int) -> Geometry:
  if resolution not in GEOMETRIES:
    raise errors.Error(f'pathfinder resolution={resolution!r} is not one of LRA\'s; valid: '
                       f'{sorted(GEOMETRIES)} (128 is Path-X).')
  return GEOMETRIES[resolution]


def _check_length(contour_length: int) -> None:
  if not isinstance(contour_length, int) or contour_length < 3:
    raise errors.Error(f'pathfinder contour_length={contour_length!r} must be an int >= 3 (LRA: 6, '
                       '9, 14 for easy, intermediate, hard).')


# ---------------------------------------------------------------- the released files


def released_dir(source_dir: str, resolution: int, contour_length: int) -> str:
  """<source_dir>/pathfinder<resolution>/<difficulty directory of contour_length>."""
  if contour_length not in DIFFICULTY_DIRS:
    raise errors.Error(f'contour_length={contour_length} has no released Pathfinder data; valid '
                       f'with source_dir: {sorted(DIFFICULTY_DIRS)}.')
  return os.path.join(source_dir, f'pathfinder{resolution}', DIFFICULTY_DIRS[contour_length])


def read_metadata(root: str) -> list[tuple[str, int]]:
  """[(image path relative to root, label)] of every line of root/metadata/*.npy, files in
  numeric order of their names (0.npy, 1.npy, ..., 10.npy), lines in file order.

  A line is 'imgs/<k> sample_<i>.png <i> <label> ...' (space-separated; LRA's builder reads the
  folder from column 0, the file from column 1, the label from column 3). Lines too short or with
  a label other than 0 / 1 raise errors.Error naming the file and line.
  """
  pattern = os.path.join(root, 'metadata', '*.npy')
  files = glob.glob(pattern)
  if not files:
    raise errors.Error(f'no Pathfinder metadata at {pattern}: put the released '
                       'lra_release/pathfinder<resolution>/<difficulty>/ there (metadata/*.npy and '
                       'imgs/), or set source_dir to \'\' to generate the data.')
  number = lambda path: [int(t) if t.isdigit() else t
                         for t in re.split(r'(\d+)', os.path.basename(path))]
  rows = []
  for path in sorted(files, key=number):
    with open(path, encoding='utf-8') as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        cols = line.split()
        if len(cols) < 4 or cols[3] not in ('0', '1'):
          what = f'label {cols[3]!r}' if len(cols) >= 4 else f'{len(cols)} columns'
          raise errors.Error(f'{path}:{line_no}: {what}; expected "imgs/<k> sample_<i>.png <i> '
                             f'<label 0 or 1> ...", got {line.strip()!r}.')
        rows.append((os.path.join(cols[0], cols[1]), int(cols[3])))
  return rows


def read_png(path: str, resolution: int) -> np.ndarray:
  """The PNG at path as uint8 [resolution, resolution] grayscale (colour converted to gray as
  PIL's 'L' does: exact when the channels are equal); errors.Error when the size differs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top (Pillow comes with matplotlib)
  with Image.open(path) as img:
    pixels = np.asarray(img if img.mode == 'L' else img.convert('L'))
  if pixels.shape != (resolution, resolution):
    raise errors.Error(f'{path}: image is {pixels.shape[1]}x{pixels.shape[0]} pixels; expected '
                       f'{resolution}x{resolution} (task.resolution).')
  return pixels


def split_rows(rows: list[Any], split: str) -> list[Any]:
  """The split's part of rows: the first 80% (rounded down) train, the next 10% validation, the
  rest test."""
  n = len(rows)
  bounds = {'train': (0, n * 8 // 10), 'validation': (n * 8 // 10, n * 9 // 10),
            'test': (n * 9 // 10, n)}
  start, end = bounds[split]
  return rows[start:end]


# ---------------------------------------------------------------- the builder's interface


def settings(task: ml_collections.ConfigDict) -> dict[str, Any]:
  """The task's Pathfinder fields (DEFAULTS where it lacks them), checked."""
  values = {k: task.get(k, v) for k, v in DEFAULTS.items()}
  _geometry(values['resolution'])
  _check_length(values['contour_length'])
  return values


def data_fields(task: ml_collections.ConfigDict) -> dict[str, int | str]:
  """The fields that name the prepared data (the released data's by resolution and length)."""
  s = settings(task)
  if s['source_dir']:
    return {'source': 'released', 'resolution': s['resolution'],
            'contour_length': s['contour_length']}
  return {k: s[k] for k in ('resolution', 'contour_length', 'num_train', 'num_valid', 'num_test',
                            'seed')}


def examples(task: ml_collections.ConfigDict,
             split: str) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
  """(key, {'inputs': uint8 [R*R] pixels row-major, 'label': int32 []}) of one split, generated or
  read from task.source_dir (module docstring); split in SPLITS. uint8 as FEATURES stores them; the
  builder's data_source serves them as int32."""
  if split not in SPLITS:
    raise errors.Error(f'split={split!r} is not a Pathfinder split; valid: {", ".join(SPLITS)}.')
  s = settings(task)
  res = s['resolution']
  if s['source_dir']:
    root = released_dir(s['source_dir'], res, s['contour_length'])
    for path, label in split_rows(read_metadata(root), split):
      pixels = read_png(os.path.join(root, path), res)
      yield path, {'inputs': pixels.reshape(-1), 'label': np.int32(label)}
    return
  count = s[{'train': 'num_train', 'validation': 'num_valid', 'test': 'num_test'}[split]]
  for start in range(0, count, _CHUNK):
    batch = generate(res, s['contour_length'], s['seed'], split, range(start, min(start + _CHUNK, count)))
    for i, (image, label) in enumerate(zip(batch.images, batch.labels)):
      yield f'{split}-{start + i}', {'inputs': image.reshape(-1), 'label': label}
