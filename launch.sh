#!/usr/bin/env bash
# efflong bootstrap. Creates .venv and installs the package on first use (or when setup.cfg
# changes), then runs one of:
#   ./launch.sh [flags]                  train; default: the duplication task with LSH attention
#   ./launch.sh test [pytest args]       the test suite, over all cores
#   ./launch.sh sweep --config=configs/<task>.py:<arg> [--parallel N] [--workdir DIR]
#   ./launch.sh bench <script> [args]    a benchmark under experiments/bench/
#   ./launch.sh generate --workdir=<run> --prompt='...' [flags]   continue a prompt (efflong.infer.generate)
#   ./launch.sh compress --workdir=<run> --out=<dir> --method=M [flags]   (efflong.compress.cli)
#   ./launch.sh multi N [flags]          N training processes on this host (jax.distributed); a lost
#                                        one stops the others (train.distributed_timeout_s)
# On SLURM, `srun ./launch.sh [flags]` runs one process per task; each joins jax.distributed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.installed-$(cksum setup.cfg pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "efflong needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1)." >&2; exit 1; }
  echo "Setting up $VENV (first run only; a few minutes)..." >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e '.[test]' >&2
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
PY="$VENV/bin/python"

case "${1:-train}" in
  test)
    shift
    exec "$PY" -m pytest -n "$(nproc)" "$@"
    ;;
  sweep)
    shift
    exec "$PY" -m efflong.sweep "$@"
    ;;
  bench)
    shift
    [ $# -ge 1 ] || { echo "usage: ./launch.sh bench <script under experiments/bench/> [args]" >&2; exit 2; }
    script=$1; shift
    [ -f "$script" ] || script="experiments/bench/${script%.py}.py"
    [ -f "$script" ] || { echo "no benchmark '$1'; have: $(ls experiments/bench/*.py | xargs -n1 basename | tr '\n' ' ')" >&2; exit 2; }
    exec "$PY" "$script" "$@"
    ;;
  generate)
    shift
    exec "$PY" -m efflong.infer.generate "$@"
    ;;
  compress)
    shift
    exec "$PY" -m efflong.compress.cli "$@"
    ;;
  multi)
    shift
    n=${1:?usage: ./launch.sh multi N [flags]}; shift
    port=$((20000 + RANDOM % 20000))
    pids=()
    # A process that fails says so in one line (which one, and its status); the others stop within
    # --config.train.distributed_timeout_s, naming it (efflong.main), or at once when it is 0.
    for ((i = 0; i < n; i++)); do
      (JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" EFFLONG_NUM_PROCESSES=$n EFFLONG_PROCESS_ID=$i \
         "$PY" -m efflong.main --distributed "$@" \
         || { s=$?; echo "launch.sh: process $i of $n exited with status $s" >&2; exit $s; }) &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status
    ;;
  train) shift || true ;&
  *)
    args=("$@")
    printf '%s\n' "${args[@]}" | grep -q -- '^--config=' || args=(--config=configs/duplication.py:attention=lsh "${args[@]}")
    printf '%s\n' "${args[@]}" | grep -q -- '^--workdir=' || args=("${args[@]}" --workdir=runs/duplication)
    exec "$PY" -m efflong.main "${args[@]}"
    ;;
esac
