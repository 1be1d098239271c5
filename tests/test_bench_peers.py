"""experiments/bench/peers.py (issue 19): its ratio summary and goal checks, without torch."""

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'bench' / 'peers.py'
_SPEC = importlib.util.spec_from_file_location('bench_peers', _PATH)
peers = sys.modules['bench_peers'] = importlib.util.module_from_spec(_SPEC)  # (for its dataclasses)
_SPEC.loader.exec_module(peers)


def test_summarize_pairs_calls_by_round():
  efflong, peer = [10.0, 20.0, 30.0], [30.0, 20.0, 90.0]
  paired = peers.summarize(efflong, peer, paired=True)
  assert (paired['efflong_ms'], paired['peer_ms']) == (20.0, 30.0)
  assert paired['ratio'] == 3.0  # The rounds' ratios are 3, 1, 3.
  assert peers.summarize(efflong, peer, paired=False)['ratio'] == 1.5  # The medians' ratio.


def test_goals_are_checked_from_the_numbers():
  ratios = {'linear': 1.3, 'linear-causal': 9.0, 'performer-causal': 12.0, 'dense': 1 / 1.4}
  rows = [{'key': key, 'T': t, 'ratio': ratio} for key, ratio in ratios.items()
          for t in (4096, 16384)]
  rows.append({'key': 'dense', 'T': 16384, 'ratio': 1 / 1.4, 'efflong_peak_mib': 3000.0})
  lines = peers.goals(rows)
  assert '- PASS: linear, bidirectional, T=4096: peer / efflong >= 1.2 (measured 1.30)' in lines
  assert '- FAIL: linear, causal, T=16384: peer / efflong >= 10 (measured 9.00)' in lines
  assert '- PASS: performer, causal, T=4096: peer / efflong >= 10 (measured 12.00)' in lines
  assert '- not measured: linformer k=256, T=4096: peer / efflong >= 1.2' in lines
  assert not any(line.startswith('- ') and 'dense, T=4096' in line for line in lines)
  assert ('- FAIL: dense, T=16384: efflong runs in <= 2 GiB (peak GiB) (measured 2.93)'
          in lines)
  assert '- not measured: dense, T=65536: efflong runs in <= 2 GiB (peak GiB)' in lines
  assert ('- PASS: dense, T=16384: efflong within 1.5x of torch SDPA (efflong / SDPA) '
          '(measured 1.40)' in lines)


def test_profile_kinds_read_from_the_hlo():
  sys.path.insert(0, str(_PATH.parent))
  try:
    import peers_profile  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(_PATH.parent))
  kind = peers_profile.kind_of
  projection = ('%ynn_fusion.3 = f32[4096,256]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name='
                '"jit(loss)/jvp(BTD,DNH->BTNH)/dot_general"}, backend_config={"fusion_config":'
                '{"kind":"__ynn_fusion"}}')
  assert kind('ynn_fusion.3', projection) == 'projection dots'
  assert kind('dot.19', '%dot.19 = f32[4,64,65]{2,1,0} dot(%a, %b)') == 'attention dots'
  assert kind('while.2', '%while.2 = (s32[], f32[4]) while(%t)') == 'loop control'
  assert kind('subtract_exponential_fusion', '%s = f32[4] fusion(%a)') == 'exp'
  assert kind('copy_bitcast_fusion.1', '%c = f32[4] fusion(%a)') == 'copies'
  assert kind('add_bitcast_fusion', '%c = f32[4] fusion(%a)') == 'elementwise and reductions'
