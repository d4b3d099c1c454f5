#!/usr/bin/env bash
# The local production stack, without containers (the topology of docker/compose.yml):
#   PostgreSQL (Debian package; databases 'prefect' and 'mlflow'), the Prefect server and the
#   MLflow server on it, a Dask scheduler with two workers, a Prefect worker on a process pool.
#
#   scripts/stack.sh start    start whatever is not running (idempotent); prints the startup time
#   scripts/stack.sh stop     stop everything this stack started (by its PID files), keep the data
#   scripts/stack.sh status   one line per service; exit 3 if any is down
#   scripts/stack.sh env      the exports that point jobs at the stack: eval "$(scripts/stack.sh env)"
#   scripts/stack.sh clean    stop, then delete the state directory (databases, artifacts, logs)
#
# Everything binds 127.0.0.1. State (logs, PIDs, ports, the generated database passwords in a
# 0600 pgpass file, artifacts) lives in $STACK_DIR (default: .stack/ in the repository). Ports
# are chosen on the first start ($STACK_PG_PORT=5433, $STACK_PREFECT_PORT=4200,
# $STACK_MLFLOW_PORT=5000, $STACK_DASK_PORT=8786) and kept. $STACK_PYTHON is the Python whose
# environment has the project (default: .venv/bin/python).
# PostgreSQL refuses to run as root: as root, the cluster runs as the 'postgres' OS user (runuser)
# in a data directory under /var/tmp that only that user can read.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE=${STACK_DIR:-$REPO/.stack}
if [ -z "${STACK_PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then STACK_PYTHON=$REPO/.venv/bin/python; else STACK_PYTHON=$(command -v python3); fi
fi
BIN=$(dirname "$STACK_PYTHON")
SERVICES=(postgres prefect-server mlflow dask-scheduler dask-worker-1 dask-worker-2 prefect-worker)
POOL=${STACK_POOL:-pruning-process}

log() { printf '[stack] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# -- configuration kept in the state directory ----------------------------------------------
load_config() {
  mkdir -p "$STATE/logs" "$STATE/pids"
  chmod 700 "$STATE"
  if [ ! -f "$STATE/stack.conf" ]; then
    cat > "$STATE/stack.conf" <<EOF
PG_PORT=${STACK_PG_PORT:-5433}
PREFECT_PORT=${STACK_PREFECT_PORT:-4200}
MLFLOW_PORT=${STACK_MLFLOW_PORT:-5000}
DASK_PORT=${STACK_DASK_PORT:-8786}
EOF
  fi
  # shellcheck source=/dev/null
  . "$STATE/stack.conf"
  PREFECT_API=http://127.0.0.1:$PREFECT_PORT/api
  MLFLOW_URI=http://127.0.0.1:$MLFLOW_PORT
  DASK_ADDRESS=tcp://127.0.0.1:$DASK_PORT
}

pg_bin() {
  local d
  d=${STACK_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
  [ -n "$d" ] && [ -x "$d/pg_ctl" ] || die "PostgreSQL binaries not found (apt-get install postgresql, or set STACK_PG_BIN)"
  echo "$d"
}

# As root the cluster belongs to the 'postgres' OS user, in a directory that user owns.
pg_dir() {
  if [ "$(id -u)" = 0 ]; then
    echo "${STACK_PG_DIR:-/var/tmp/pruning-stack-pg-$(printf '%s' "$STATE" | sha256sum | cut -c1-12)}"
  else
    echo "$STATE/postgres"
  fi
}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# -- processes --------------------------------------------------------------------------------
pid_of() { cat "$STATE/pids/$1.pid" 2>/dev/null || true; }

running() {  # running NAME: its recorded process is alive (and is still ours, not a reused PID)
  local pid
  pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -qa "STACK_DIR=$STATE" "/proc/$pid/environ" 2>/dev/null
}

launch() {  # launch NAME CMD...: detached, in its own process group, logging to logs/NAME.log
  local name=$1; shift
  ( cd "$REPO" && exec setsid env STACK_DIR="$STATE" "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null ) &
  echo $! > "$STATE/pids/$name.pid"
}

wait_ready() {  # wait_ready NAME PROBE ARGS...
  local name=$1; shift
  if ! "$STACK_PYTHON" "$REPO/scripts/stack_wait.py" "$@" --pid "$(pid_of "$name")" --timeout "${STACK_TIMEOUT:-180}"; then
    log "$name did not become ready; last lines of $STATE/logs/$name.log:"
    tail -n 30 "$STATE/logs/$name.log" >&2 || true
    exit 1
  fi
}

common_env() {  # ENV: environment of every Python service (offline, no telemetry, project importable)
  ENV=(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PGPASSFILE="$STATE/pgpass"
    PREFECT_HOME="$STATE/prefect-home" PREFECT_API_URL="$PREFECT_API" MLFLOW_TRACKING_URI="$MLFLOW_URI"
    PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1
    PREFECT_LOGGING_EXTRA_LOGGERS=pruning_core DASK_DISTRIBUTED__LOGGING__DISTRIBUTED=error
    TOKENIZERS_PARALLELISM=false)
}

# -- PostgreSQL -------------------------------------------------------------------------------
new_password() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

pg_init() {  # a fresh cluster with a superuser and one role + database per server
  local bin=$1 dir=$2 pwfile
  log "initialising PostgreSQL in $dir"
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  chmod 700 "$dir"
  local admin prefect mlflow mask
  mask=$(umask); umask 077
  admin=$(new_password); prefect=$(new_password); mlflow=$(new_password)
  {
    echo "127.0.0.1:$PG_PORT:*:stack_admin:$admin"
    echo "127.0.0.1:$PG_PORT:prefect:prefect:$prefect"
    echo "127.0.0.1:$PG_PORT:mlflow:mlflow:$mlflow"
  } > "$STATE/pgpass"
  chmod 600 "$STATE/pgpass"
  pwfile="$dir/.pwfile"
  printf '%s\n' "$admin" > "$pwfile"
  [ "$(id -u)" = 0 ] && chown postgres: "$pwfile"
  as_pg "$bin/initdb" -D "$dir/data" -U stack_admin --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 \
    --no-instructions >>"$STATE/logs/postgres.log" 2>&1
  rm -f "$pwfile"
  umask "$mask"
}

pg_setup_databases() {  # roles and databases; passwords go through stdin, never argv
  local bin=$1 sql
  sql=$(awk -F: '$4 != "stack_admin" { printf "CREATE ROLE %s LOGIN PASSWORD '\''%s'\'';\nCREATE DATABASE %s OWNER %s;\n", $4, $5, $3, $3 }' "$STATE/pgpass")
  printf '%s\n' "$sql" | PGPASSFILE="$STATE/pgpass" "$bin/psql" -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" \
    -U stack_admin -d postgres >>"$STATE/logs/postgres.log"
  # Prefect's migrations need pg_trgm, which only a superuser may create.
  echo "CREATE EXTENSION IF NOT EXISTS pg_trgm;" | PGPASSFILE="$STATE/pgpass" "$bin/psql" -q -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$PG_PORT" -U stack_admin -d prefect >>"$STATE/logs/postgres.log"
  touch "$STATE/databases.created"
}

start_postgres() {
  local bin dir
  bin=$(pg_bin); dir=$(pg_dir)
  [ -f "$dir/data/PG_VERSION" ] || { rm -f "$STATE/databases.created"; pg_init "$bin" "$dir"; }
  if ! as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=''" start >/dev/null \
      || { tail -n 20 "$dir/postgres.log" >&2; die "PostgreSQL did not start"; }
  fi
  head -n 1 "$dir/data/postmaster.pid" > "$STATE/pids/postgres.pid"
  [ -f "$STATE/databases.created" ] || pg_setup_databases "$bin"
}

stop_postgres() {
  local bin dir
  bin=$(pg_bin 2>/dev/null) || return 0
  dir=$(pg_dir)
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -f "$STATE/pids/postgres.pid"
}

postgres_running() {
  local bin dir
  bin=$(pg_bin 2>/dev/null) || return 1
  dir=$(pg_dir)
  [ -f "$dir/data/PG_VERSION" ] && as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

# -- the Python services ----------------------------------------------------------------------
start_servers() {  # Prefect server, MLflow server, Dask scheduler: launched together, then awaited
  common_env
  if ! running prefect-server; then
    launch prefect-server env "${ENV[@]}" \
      PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://prefect@127.0.0.1:$PG_PORT/prefect" \
      PREFECT_UI_ENABLED="${STACK_PREFECT_UI:-true}" \
      "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  fi
  if ! running mlflow; then
    mkdir -p "$STATE/mlartifacts"
    launch mlflow env "${ENV[@]}" \
      MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow" \
      "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --artifacts-destination "$STATE/mlartifacts"
  fi
  if ! running dask-scheduler; then
    launch dask-scheduler env "${ENV[@]}" \
      "$BIN/dask" scheduler --host 127.0.0.1 --port "$DASK_PORT" --dashboard-address 127.0.0.1:0
  fi
  wait_ready dask-scheduler dask "$DASK_ADDRESS" --workers 0
  wait_ready prefect-server http "$PREFECT_API/health" --expect true
  wait_ready mlflow http "$MLFLOW_URI/health" --expect OK
}

start_workers() {
  local i
  common_env
  for i in 1 2; do
    running "dask-worker-$i" && continue
    launch "dask-worker-$i" env "${ENV[@]}" \
      "$BIN/dask" worker "$DASK_ADDRESS" --name "stack-worker-$i" --host 127.0.0.1 --nthreads 1 --nworkers 1 \
      --dashboard-address 127.0.0.1:0 --memory-limit "${STACK_DASK_MEMORY:-6GiB}" --local-directory "$STATE/dask-worker-$i"
  done
  if ! running prefect-worker; then
    launch prefect-worker env "${ENV[@]}" PREFECT_WORKER_QUERY_SECONDS="${STACK_WORKER_POLL_SECONDS:-3}" \
      "$BIN/prefect" worker start --pool "$POOL" --type process --name stack-process-worker
  fi
  wait_ready dask-worker-2 dask "$DASK_ADDRESS" --workers 2
  wait_ready prefect-worker prefect-worker "$PREFECT_API" "$POOL"
}

alive_any() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

stop_services() {  # SIGTERM each process group (all at once), SIGKILL whatever is left after 20 s
  local name pid i pids=()
  for name in "$@"; do
    if running "$name"; then
      pid=$(pid_of "$name"); pids+=("$pid")
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/pids/$name.pid"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  for i in $(seq 1 80); do alive_any "${pids[@]}" || break; sleep 0.25; done
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && log "process group $pid did not stop within 20 s: SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}

# -- commands ---------------------------------------------------------------------------------
cmd_start() {
  local t0 t1
  t0=$(date +%s.%N)
  load_config
  [ -x "$BIN/prefect" ] && [ -x "$BIN/mlflow" ] && [ -x "$BIN/dask" ] \
    || die "prefect, mlflow and dask must be installed next to $STACK_PYTHON (set STACK_PYTHON)"
  start_postgres
  start_servers
  start_workers
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", b - a }' > "$STATE/startup_seconds"
  log "stack ready in $(cat "$STATE/startup_seconds") s (state: $STATE)"
  cmd_env
}

cmd_stop() {
  [ -d "$STATE" ] || return 0
  load_config
  stop_services "${SERVICES[@]:1}"
  stop_postgres
  log "stopped"
}

cmd_status() {
  [ -f "$STATE/stack.conf" ] || { log "no stack in $STATE"; return 3; }
  load_config
  local down=0 name
  for name in "${SERVICES[@]}"; do
    if { [ "$name" = postgres ] && postgres_running; } || { [ "$name" != postgres ] && running "$name"; }; then
      printf '%-16s running (pid %s)\n' "$name" "$(pid_of "$name")"
    else
      printf '%-16s stopped\n' "$name"; down=1
    fi
  done
  printf 'Prefect API  %s\nMLflow       %s\nDask         %s\nPostgreSQL   127.0.0.1:%s\n' \
    "$PREFECT_API" "$MLFLOW_URI" "$DASK_ADDRESS" "$PG_PORT"
  [ $down = 0 ] || return 3
}

cmd_env() {
  load_config
  printf 'export PREFECT_API_URL=%s\nexport MLFLOW_TRACKING_URI=%s\nexport DASK_SCHEDULER_ADDRESS=%s\n' \
    "$PREFECT_API" "$MLFLOW_URI" "$DASK_ADDRESS"
}

cmd_clean() {
  cmd_stop
  local dir
  dir=$(pg_dir)
  case "$dir" in /var/tmp/pruning-stack-pg-*|"$STATE"/*) rm -rf "$dir" ;; esac
  rm -rf "$STATE"
  log "removed $STATE"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  clean) cmd_clean ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
