#!/usr/bin/env bash
# A two-node Ray cluster on this machine: a head node and a worker node started with `ray start` (addressed on
# 127.0.0.1, no dashboard, one CPU each), a short backbone sweep run against them through RAY_ADDRESS (its two
# Ray Train workers land one on each node), then both nodes stopped, also on error or Ctrl-C. The dress
# rehearsal for a cluster run: the same driver code, the same RAY_ADDRESS mechanism, checkpoints in shared
# storage (here a folder every node sees), and MLflow in a sqlite file.
#
#   cluster/local_multinode.sh                      # work folder: a fresh temporary one, removed at the end
#   WORKDIR=/tmp/mn KEEP=1 cluster/local_multinode.sh --epochs 2    # extra flags go to `python -m jobs.sweep`
#
# Environment: PYTHON (default: .venv/bin/python of this repo), HEAD_CPUS and WORKER_CPUS (default 1 each),
# BACKBONES (default resnet18), WORKDIR, KEEP=1 (keep WORKDIR: data, checkpoints, mlflow.db, logs).
# Exit status: the sweep's. Only the processes this script started are stopped: each node runs in its own
# process group, which is signalled by id (never `ray stop`, which would stop every Ray on the machine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
BACKBONES="${BACKBONES:-resnet18}"

if [[ ! -x "$PYTHON" || ! -x "$BIN/ray" ]]; then
  echo "local_multinode: no Python with Ray at '$PYTHON'; run 'make install' (or set PYTHON=...)" >&2
  exit 2
fi

if [[ -n "${WORKDIR:-}" ]]; then
  mkdir -p "$WORKDIR"
  WORK="$(cd "$WORKDIR" && pwd)"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/fp-multinode.XXXXXX")"
fi
# Ray puts Unix sockets under its temp dir, and socket paths are limited to about 107 bytes: keep it short.
RAYTMP="$(mktemp -d /tmp/fpmn.XXXXXX)"

# Two cores are shared by the nodes, their workers and the driver: one torch thread per process.
export OMP_NUM_THREADS=1
# Ray's gRPC servers listen on every interface whatever address they are given, so the nodes run with token
# auth: a fresh token for this run only (never one another local cluster left in ~/.ray).
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_TOKEN
# Ray's usage-stats prompt and upload: nothing may leave this machine.
export RAY_USAGE_STATS_ENABLED=0
# On SIGTERM a node first waits for its work to drain (30 s by default); when this script stops the nodes the
# sweep is over or abandoned, so there is nothing to wait for.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=2

HEAD_PID=""
WORKER_PID=""

gone() {  # gone PGID SECONDS: wait up to SECONDS for every process of the group to exit
  for _ in $(seq "$2"); do
    kill -0 -- "-$1" 2>/dev/null || return 0
    sleep 1
  done
  ! kill -0 -- "-$1" 2>/dev/null
}

stop_group() {  # stop_group PGID NAME: SIGTERM the node's process group, SIGKILL what is left after 30 s
  local pgid="$1" name="$2"
  [[ -n "$pgid" ]] || return 0
  kill -0 -- "-$pgid" 2>/dev/null || return 0
  echo "local_multinode: stopping the $name node (process group $pgid)"
  kill -TERM -- "-$pgid" 2>/dev/null || true
  gone "$pgid" 30 && return 0
  echo "local_multinode: the $name node ignored SIGTERM for 30 s; killing it" >&2
  kill -KILL -- "-$pgid" 2>/dev/null || true
  gone "$pgid" 10 || echo "local_multinode: process group $pgid still has processes" >&2
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Worker first, so the head does not spend time noticing a lost node.
  stop_group "$WORKER_PID" worker
  stop_group "$HEAD_PID" head
  wait 2>/dev/null || true
  if [[ "${KEEP:-0}" == 1 ]]; then
    for node in head worker; do
      mkdir -p "$WORK/ray-logs"
      cp -r "$RAYTMP/$node/session_latest/logs" "$WORK/ray-logs/$node" 2>/dev/null || true
    done
    echo "local_multinode: kept $WORK"
  else
    rm -rf "$WORK"
  fi
  rm -rf "$RAYTMP"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_ports() {  # free_ports N: N distinct TCP ports free on 127.0.0.1 right now
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Every port a node opens is chosen here rather than left at Ray's defaults (6379, 10001, 52365, ...): other
# Ray instances may run on this machine, and two nodes on one host cannot share those defaults.
read -r GCS_PORT CLIENT_PORT <<<"$(free_ports 2)"
node_ports() {
  local p
  read -r -a p <<<"$(free_ports 6)"
  echo "--node-manager-port=${p[0]} --object-manager-port=${p[1]} --dashboard-agent-listen-port=${p[2]}" \
       "--dashboard-agent-grpc-port=${p[3]} --metrics-export-port=${p[4]} --runtime-env-agent-port=${p[5]}"
}
# A small object store per node: the sweep passes checkpoints through storage, not the object store.
# No --node-ip-address: Ray replaces a loopback address with the host's own (resolve_ip_for_localhost) and binds
# its gRPC servers on every interface whatever it is given. What keeps it closed is the token (above); this
# script also runs no dashboard (no job API), sets RAY_ADDRESS on 127.0.0.1 and picks its ports free here.
COMMON=(--object-store-memory=200000000 --disable-usage-stats --block)

export RAY_ADDRESS="127.0.0.1:$GCS_PORT"
echo "local_multinode: work folder $WORK, Ray temp $RAYTMP, RAY_ADDRESS=$RAY_ADDRESS"

# setsid: each node leads its own process group, so cleanup can signal exactly its processes.
# shellcheck disable=SC2046  # node_ports prints several flags on purpose
setsid "$BIN/ray" start --head --port="$GCS_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --include-dashboard=false --num-cpus="$HEAD_CPUS" --temp-dir="$RAYTMP/head" $(node_ports) "${COMMON[@]}" \
  >"$WORK/head.log" 2>&1 &
HEAD_PID=$!

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 2 s until it succeeds, print its output
  local deadline=$((SECONDS + $1)) what="$2" out
  shift 2
  until out="$("$@" 2>/dev/null)"; do
    if ((SECONDS > deadline)); then
      echo "local_multinode: timed out waiting for $what; logs in $WORK/*.log" >&2
      tail -n 20 "$WORK"/*.log >&2 || true
      return 1
    fi
    if ! kill -0 "$HEAD_PID" 2>/dev/null; then
      echo "local_multinode: the head node exited" >&2
      tail -n 40 "$WORK/head.log" >&2
      return 1
    fi
    sleep 2
  done
  if [[ -n "$out" ]]; then echo "local_multinode: $out"; fi
}
wait_for 120 "the head node" "$BIN/ray" health-check --address "$RAY_ADDRESS"

# shellcheck disable=SC2046
setsid "$BIN/ray" start --address="$RAY_ADDRESS" --num-cpus="$WORKER_CPUS" --temp-dir="$RAYTMP/worker" \
  $(node_ports) "${COMMON[@]}" >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!

# Both nodes registered and alive, each with its CPUs, before any work is sent.
NODES_UP="
import ray, sys
ray.init(logging_level='ERROR')
alive = [n for n in ray.nodes() if n['Alive']]
print(len(alive), 'nodes, CPUs:', [n['Resources'].get('CPU') for n in alive])
sys.exit(0 if len(alive) == 2 and ray.cluster_resources().get('CPU') == $HEAD_CPUS + $WORKER_CPUS else 1)
"
wait_for 120 "two live nodes" "$PYTHON" -c "$NODES_UP"
echo "local_multinode: head and worker nodes are up"

# The bundled sample benchmark, made here: tiny, so the whole run takes a couple of minutes on 2 cores.
"$BIN/fingerprint" sample-data --out "$WORK/data/sample" --patients 8 --slices-per-patient 2 --size 32 \
  --generated 24 --seed 0

# The sweep as a driver attached to the cluster through RAY_ADDRESS. Two Ray Train workers of one CPU each
# cannot fit on one node, so every trial trains across both nodes.
cd "$WORK"
"$PYTHON" -m jobs.sweep --data "$WORK/data/sample" --presets triplet --backbones "$BACKBONES" --weights none \
  --image-size 32 --embed-dim 16 --epochs 1 --triplets-per-epoch 32 --batch-size 8 --k 3 --num-workers 2 --cpus-per-worker 1 \
  --storage-path "$WORK/ray-results" --tracking-uri "sqlite:///$WORK/mlflow.db" --out "$WORK/runs" "$@"
echo "local_multinode: sweep finished"
