"""Long Range Arena (Tay et al. 2021, "Long Range Arena: A Benchmark for Efficient Transformers").

Argument: `configs/lra.py:<task>[,attention=<family>][,paper][,pack][,smoke][,distill=<run>]`,
task one of listops, text, retrieval, image, pathfinder (efflong/tasks/lra: data, fields, batches;
the models: efflong/models/classifier.py); `distill` names a trained run of the same task to
distil from (config.distill, efflong/compress/distill.py).

  python -m efflong.main --config=configs/lra.py:listops --workdir=runs/lra/listops
  ./launch.sh sweep --config=configs/lra.py:listops,families --parallel 2
  ./launch.sh sweep --config=configs/lra.py:pathfinder,families --parallel 2
  python -m efflong.main --config=configs/lra.py:text,paper,attention=performer --workdir=...
Test accuracy: the same command with --config.task.eval_split=test on a finished workdir (the
trainer finds the last checkpoint, trains no further and evaluates on the test split).

The default is CPU-sized (two runs at once on a 2-core machine):
  listops     generated trees of 50 < L < 256 tokens (20K / 1K / 1K, mean length 154; the train
              split's majority class 0 is 0.154 of validation, 0.179 of test), seq_len 255 (+ the
              CLS: 256), CLS pooling, 2 layers, d_model 128, 4 heads, d_ff 256, 800 steps of 32,
              Adam 1e-3 cosine after 100 warmup steps; dense ~0.62 CPU-s a step, 10-20 min a
              point with two at once. Every family reaches 33-36% test accuracy against the
              majority class's 17.9% (experiments/results/lra_listops.md).
  pathfinder  generated Pathfinder-32 (hard: contour length 14; 20K / 512 / 1024), 1024 pixels,
              mean pooling (LRA's for Pathfinder), 2 layers, d_model 32, 2 heads, d_ff 64, 600
              steps of 16; dense ~2.4 CPU-s a step (T^2 = 1M scores a head): ~27 min a point.
  text        IMDb bytes at seq_len 1000 (LRA's repo; the paper 4000), truncate, 2 layers.
  retrieval   AAN byte pairs at seq_len 1000 per document, the dual encoder, 2 layers.
  image       CIFAR-10 grayscale, 1024 pixels, learned positions, 2 layers.
Text, retrieval and image need their released data (task.source_dir or prepared TFDS; see their
modules); `pack` packs Text / ListOps rows (task.max_segments examples per row).

`paper` is the LRA setup per task, for a GPU / TPU. ListOps and Text follow the paper's appendix
(A.1, A.2; the search tool reached these two paragraphs, also quoted in LRA issue #21): 6 layers,
d_model 512, 8 heads, d_ff 2048, batch 32, Adam (decoupled weight decay 0.1) with lr 0.05 under
`constant * linear_warmup * rsqrt_decay`, i.e. a peak of 0.05 / sqrt(warmup) at the end of the
warmup (warmup 1000 / 8000 steps: LRA's repo, not in the paper), then rsqrt decay (ours decays as
sqrt(w / (step + w)), LRA's as sqrt(w / step)); ListOps 5K steps at length 2000, Text 20K steps
at 4000 (the repo used 4 layers, d_model 256, length 1000: the paper's values are used here).
Retrieval, Image and Pathfinder: we could not read the appendix here, so these follow LRA's repo
configs (base_match_config: 4 layers, 128, 4 heads, d_ff 512, 5K steps of 32, length 4000 per
document, lr 0.05 rsqrt with warmup 8000; cifar10/transformer_base: 1 layer, 128, 8 heads, d_ff
128, dropout 0.3, learned positions, batch 256, 35K steps (200 epochs), lr 5e-4 cosine, warmup one
epoch; pathfinder32/transformer_base: 4 layers, 32, 4 heads, d_ff 32, dropout 0.2, batch 512, 62.4K
steps (200 epochs), lr 1e-3 cosine, warmup one epoch, mean pooling). LRA's qkv_dim differs from
d_model in the image and pathfinder configs (64 of 128, 16 of 32); here heads split d_model. The
classifier head is LRA's: Dense(d_ff), ReLU, Dense(C) (dual encoder: two hidden layers).

LRA Table 1 (test accuracy, %), ours beside it in experiments/results/lra.md; our families map to
the paper's rows: dense = Transformer, local = Local Attention, strided and fixed = Sparse
Transformer, longformer, bigbird, lsh = Reformer, linformer, linear = Linear Transformer, performer:
              ListOps  Text   Retrieval  Image  Pathfinder
  dense        36.37   64.27  57.46      42.44  71.40
  local        15.82   52.98  53.39      41.46  66.63
  strided/fixed 17.07  63.58  59.59      44.24  71.71
  longformer   35.63   62.85  56.89      42.22  69.71
  bigbird      36.05   64.02  59.29      40.83  74.87
  lsh          37.27   56.10  53.40      38.07  68.50
  linformer    35.70   53.94  52.27      38.56  76.34
  linear       16.13   65.90  53.09      42.34  75.30
  performer    18.01   65.40  53.82      42.77  77.05
  (Path-X: every model FAIL, i.e. chance.) Chance / majority: ListOps majority class about 0.2
  (measure it on the generated split), Text, Retrieval and Pathfinder 50, Image 10.

Family hyper-parameters (`family_kw`) scale with the attention length L (seq_len, + 1 with CLS
pooling): local window L/16 each side; longformer window L/16 with the first token (the CLS)
global; strided stride ~sqrt(L) rounded to a power of two; fixed block L/16 with 4 summary
positions; bigbird block L/16, one window block each side, 2 random blocks, 1 global token; lsh
buckets of L/16, 2 rounds; linformer k = L/8 (LRA's Text used 32 at 1000); performer 64 softmax
features (FAVOR+); linear elu + 1 features. With `pack`, linformer projects each of the
max_segments examples apart and longformer / bigbird have no global token.

`get_sweep('<task>,families')` trains every family (FAMILIES) on the task; the rest of the arg
applies to each point (e.g. `listops,families,smoke`).
"""

from __future__ import annotations

import math

import ml_collections

from efflong import config as config_lib
from efflong import errors

TASKS = ('listops', 'text', 'retrieval', 'image', 'pathfinder')
FAMILIES = ('dense', 'local', 'longformer', 'strided', 'fixed', 'bigbird', 'lsh', 'linformer',
            'linear', 'performer')
ARGS = dict(**{t: False for t in TASKS}, attention='dense', paper=False, pack=False, smoke=False,
            families=False, distill='')
CURVES = ('eval/accuracy', 'train/loss')
# LRA Table 1, test accuracy (%) per family and task, as in the docstring (strided and fixed: the
# paper's Sparse Transformer row); experiments/bench/lra_report.py puts ours beside it.
TABLE1 = {
    'dense': (36.37, 64.27, 57.46, 42.44, 71.40),
    'local': (15.82, 52.98, 53.39, 41.46, 66.63),
    'strided': (17.07, 63.58, 59.59, 44.24, 71.71),
    'fixed': (17.07, 63.58, 59.59, 44.24, 71.71),
    'longformer': (35.63, 62.85, 56.89, 42.22, 69.71),
    'bigbird': (36.05, 64.02, 59.29, 40.83, 74.87),
    'lsh': (37.27, 56.10, 53.40, 38.07, 68.50),
    'linformer': (35.70, 53.94, 52.27, 38.56, 76.34),
    'linear': (16.13, 65.90, 53.09, 42.34, 75.30),
    'performer': (18.01, 65.40, 53.82, 42.77, 77.05),
}

# Per task: (VOCAB_SIZE, NUM_CLASSES) of its module, kept here so a config needs no data imports.
_SIZES = {'listops': (16, 10), 'text': (257, 2), 'retrieval': (257, 2), 'image': (256, 10),
          'pathfinder': (256, 2)}
_CPU_MODEL = dict(num_layers=2, d_model=128, num_heads=4, d_ff=256)
_CPU_TRAIN = dict(steps=1500, batch_size=32, learning_rate=1e-3, schedule='cosine',
                  warmup_steps=100, weight_decay=0.0)
CPU = {
    # 255 tokens + the CLS: an attention length of 256, which every block size divides.
    'listops': dict(task=dict(seq_len=255, min_len=50, max_len=256, num_train=20000,
                              num_valid=1000, num_test=1000),
                    model=dict(pooling='cls'), train=dict(steps=800)),
    'pathfinder': dict(task=dict(seq_len=1024, resolution=32, contour_length=14,
                                 num_train=20000, num_valid=512, num_test=1024),
                       model=dict(pooling='mean', d_model=32, num_heads=2, d_ff=64),
                       train=dict(steps=600, batch_size=16)),
    'text': dict(task=dict(seq_len=1000, truncate=True), model=dict(pooling='cls'), train={}),
    'retrieval': dict(task=dict(seq_len=1000, truncate=True), model=dict(pooling='cls'),
                      train={}),
    'image': dict(task=dict(seq_len=1024), model=dict(pooling='cls', positions='learned'),
                  train={}),
}
_LRA_ADAM = dict(schedule='rsqrt', weight_decay=0.1, grad_clip=0.0)
_APPENDIX = dict(num_layers=6, d_model=512, num_heads=8, d_ff=2048, pooling='cls')
PAPER = {
    'listops': dict(task=dict(seq_len=2000, min_len=500, max_len=2000, num_train=96000,
                              num_valid=2000, num_test=2000),
                    model=_APPENDIX,
                    train=dict(steps=5000, batch_size=32, learning_rate=0.05 / math.sqrt(1000),
                               warmup_steps=1000, **_LRA_ADAM)),
    'text': dict(task=dict(seq_len=4000, truncate=True), model=_APPENDIX,
                 train=dict(steps=20000, batch_size=32, learning_rate=0.05 / math.sqrt(8000),
                            warmup_steps=8000, **_LRA_ADAM)),
    'retrieval': dict(task=dict(seq_len=4000, truncate=True),
                      model=dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, pooling='cls'),
                      train=dict(steps=5000, batch_size=32, learning_rate=0.05 / math.sqrt(8000),
                                 warmup_steps=8000, **_LRA_ADAM)),
    'image': dict(task=dict(seq_len=1024),
                  model=dict(num_layers=1, d_model=128, num_heads=8, d_ff=128, dropout_rate=0.3,
                             pooling='cls', positions='learned'),
                  train=dict(steps=35000, batch_size=256, learning_rate=5e-4, schedule='cosine',
                             warmup_steps=175, weight_decay=0.0, grad_clip=0.0)),
    'pathfinder': dict(task=dict(seq_len=1024, resolution=32, contour_length=14,
                                 num_train=160000, num_valid=20000, num_test=20000),
                       model=dict(num_layers=4, d_model=32, num_heads=4, d_ff=32,
                                  dropout_rate=0.2, pooling='mean'),
                       train=dict(steps=62400, batch_size=512, learning_rate=1e-3,
                                  schedule='cosine', warmup_steps=312, weight_decay=0.0,
                                  grad_clip=0.0)),
}


def parse(arg: str) -> tuple[str, dict]:
  """(task name, the arguments); exactly one task must be named."""
  args = config_lib.parse_arg(arg, ARGS)
  named = [t for t in TASKS if args[t]]
  if len(named) != 1:
    raise errors.Error(f'configs/lra.py needs exactly one task of {list(TASKS)} in its argument '
                       f'(e.g. configs/lra.py:listops); got {named or "none"}.')
  return named[0], args


def family_kw(name: str, length: int, *, max_segments: int = 1) -> dict:
  """Each family's hyper-parameters at attention length `length` (see the module docstring)."""
  part = max(1, length // 16)
  packed = max_segments > 1
  return {
      'local': dict(window=part),
      'longformer': dict(window=part, global_tokens=0 if packed else 1),
      'strided': dict(stride=2 ** round(math.log2(math.sqrt(length)))),
      'fixed': dict(block=part, summary=4),
      'bigbird': dict(block=part, window=1, random_blocks=2, global_tokens=0 if packed else 1),
      'lsh': dict(bucket_size=part, n_hashes=2),
      'linformer': dict(k=max(1, length // 8), segments=max_segments),
      'performer': dict(nb_features=64),
  }.get(name, {})


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  name, args = parse(arg)
  setup = (PAPER if args['paper'] else CPU)[name]
  c = config_lib.base(name)
  vocab, classes = _SIZES[name]
  c.task.update(dict(vocab_size=vocab, num_classes=classes, truncate=False, pack=args['pack'],
                     max_segments=1, data_dir='', source_dir='', eval_split='validation'))
  c.task.update(setup['task'])
  if args['pack']:
    c.task.max_segments = 8 if name == 'text' else 16
  c.model.kind = 'dual_encoder' if name == 'retrieval' else 'classifier'
  if not args['paper']:
    c.model.update(_CPU_MODEL)
  c.model.update(setup['model'])
  c.model.classifier_mlp_dim = c.model.d_ff
  if not args['paper']:
    c.train.update(_CPU_TRAIN)
  c.train.update(setup['train'])
  c.train.log_every = 50
  c.train.eval_every = c.train.checkpoint_every = max(150, c.train.steps // 10)
  c.eval.batch_size = 32 if not args['paper'] else c.train.batch_size
  c.eval.steps = 0  # the whole validation split

  config_lib.set_attention(c, args['attention'])
  length = c.task.seq_len + (c.task.max_segments if c.model.pooling == 'cls' else 0)
  c.model.attention_kw.update(family_kw(args['attention'], length,
                                        max_segments=c.task.max_segments))
  c.distill.teacher_workdir = args['distill']
  if args['smoke']:
    smoke(c, name)
  return c


def smoke(c: ml_collections.ConfigDict, name: str) -> None:
  """What the tests run: config_lib.smoke's tiny model and steps, short examples, tiny splits."""
  config_lib.smoke(c)
  c.model.num_layers, c.model.classifier_mlp_dim = 1, 16
  c.task.seq_len = 64
  if name == 'listops':
    c.task.update(min_len=8, max_len=60, num_train=64, num_valid=16, num_test=16)
  elif name == 'pathfinder':
    c.task.update(seq_len=1024, num_train=32, num_valid=16, num_test=16)
  elif name == 'image':
    c.task.seq_len = 1024
  length = c.task.seq_len + (c.task.max_segments if c.model.pooling == 'cls' else 0)
  c.model.attention_kw.update(family_kw(c.model.attention, length,
                                        max_segments=c.task.max_segments))
  c.eval.steps = 2


def get_sweep(arg: str = '') -> list[dict]:
  """`<task>,families`: one point per family in FAMILIES, the rest of arg kept."""
  name, args = parse(arg)
  if not args['families']:
    raise errors.Error("configs/lra.py sweeps the attention families: give 'families' "
                       f'(e.g. configs/lra.py:{name},families).')
  return [{'arg': f'attention={family}'} for family in FAMILIES]
