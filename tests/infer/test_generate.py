"""The generate command on a trained smoke run: restore, encode, decode, and its one-line errors."""

import os
import subprocess

import jax
import jax.numpy as jnp
import pytest

from efflong import config as config_lib
from efflong import errors
from efflong.infer import generate
from efflong.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LEN, VOCAB = 8, 8  # 0 w 0 w with |w| = 3 over 7 symbols: 100 steps copy most of them


def _config(arg: str):
  return config_lib.load_module(os.path.join(ROOT, 'configs', 'duplication.py')).get_config(arg)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A dense duplication run part-way trained (eval/seq_accuracy near 0.8)."""
  config = _config(f'smoke,attention=dense,seq_len={SEQ_LEN}')
  with config.unlocked():
    config.task.vocab_size = VOCAB
    config.train.update(steps=100, batch_size=32, learning_rate=3e-3, log_every=50,
                        eval_every=100, checkpoint_every=100)
    config.eval.update(steps=2, batch_size=64)
  workdir = str(tmp_path_factory.mktemp('dup'))
  final = trainer.train_and_evaluate(config, workdir)
  return workdir, final


def test_generate_continues_greedily_with_the_trained_parameters(run):
  """The restored model continues the prompt as re-running its whole prefix per token does; that
  the parameters are the trained ones, test_duplication_by_decoding shows (its accuracy)."""
  workdir, _ = run
  text, out = generate.generate_text(workdir, '0 3 1')
  model, step = generate.load_model(workdir)
  assert step == 100
  forward = jax.jit(lambda tokens: model({'inputs': tokens}))
  seq = [0, 3, 1]
  while len(seq) < SEQ_LEN:  # padded to SEQ_LEN: causal
    logits = forward(jnp.asarray([seq + [0] * (SEQ_LEN - len(seq))]))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  assert text == ' '.join(map(str, seq[3:]))
  assert out.lengths.tolist() == [SEQ_LEN - 3]


def test_duplication_by_decoding_equals_teacher_forcing(run):
  workdir, final = run
  result = generate.duplication_by_decoding(workdir)
  assert result['examples'] == 128
  assert result['teacher_forced_seq_accuracy'] == pytest.approx(final['eval/seq_accuracy'])
  assert 0.2 < result['decoding_seq_accuracy'] < 1.0  # part-way trained: the test can tell
  assert result['decoding_seq_accuracy'] == result['teacher_forced_seq_accuracy']
  assert result['agreement'] == 1.0


def test_codecs():
  text = 'def f(x): return "é"\n'
  codec = generate.CODECS['bytes_lm']
  assert codec.decode(codec.encode(text, 256)) == text
  assert generate.CODECS['duplication'].encode(' 0 5  3 7 0', 8) == [0, 5, 3, 7, 0]


def _workdir_with_config(tmp_path, arg):
  (tmp_path / 'config.json').write_text(_config(arg).to_json_best_effort())
  return str(tmp_path)


@pytest.mark.parametrize('make, kw, message', [
    (lambda run, tmp: str(tmp), {}, "no config.json in '"),
    (lambda run, tmp: _workdir_with_config(tmp, 'smoke'), {}, "no checkpoint in '"),
    (lambda run, tmp: _workdir_with_config(tmp, 'smoke,attention=linformer,fill'), {},
     "attention 'linformer' cannot decode with a cache"),
    (lambda run, tmp: run[0], dict(prompt='0 ' * SEQ_LEN), 'the prompt has 8 tokens; the model '
     'takes at most max_len=8'),
    (lambda run, tmp: run[0], dict(prompt='0 9'), 'symbols [9] are outside the vocabulary [0, 8)'),
    (lambda run, tmp: run[0], dict(top_p=1.5), 'top_p=1.5 must be in (0, 1]'),
])
def test_errors_are_one_line(run, tmp_path, make, kw, message):
  kw = {'prompt': '0 1', **kw}
  with pytest.raises(errors.Error) as e:
    generate.generate_text(make(run, tmp_path), kw.pop('prompt'), **kw)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_command(run):
  workdir, _ = run
  command = [os.path.join(ROOT, 'launch.sh'), 'generate', f'--workdir={workdir}', "--prompt=0 3 1"]
  ok = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
  text, speed = ok.stdout.strip().splitlines()[-2:]
  assert text == generate.generate_text(workdir, '0 3 1')[0]
  assert speed.startswith('[5 tokens in ') and 'tokens/s' in speed
  bad = subprocess.run(command + ['--top_p=0'], capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines() == [
      'efflong: top_p=0.0 must be in (0, 1] (1: no nucleus filter). (EFFLONG_TRACEBACK=1 shows '
      'the traceback)']
