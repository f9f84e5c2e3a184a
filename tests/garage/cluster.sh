#!/usr/bin/env bash
# A real three-node Garage cluster (replication factor 3) on 127.0.0.1, for the tests
# and the benchmark. Garage is an S3-compatible distributed object store
# (`cargo install garage --locked --version 2.5.0`; .ci/run installs it).
#
#   eval "$(tests/garage/cluster.sh start DIR [--watch PID] [--base-port N])"
#       starts three `garage server` processes, each with its own config, metadata and
#       data directories under DIR/nodeN, connects them, assigns and applies a layout,
#       creates the bucket `registry` and a key allowed on it, and prints:
#       S3_ENDPOINT (node 1) S3_ENDPOINT_2 S3_ENDPOINT_3 S3_REGION S3_BUCKET
#       S3_ACCESS_KEY_ID S3_SECRET_ACCESS_KEY GARAGE_PIDS GARAGE_DIR GARAGE_CONF_1..3
#       With --watch PID the cluster is stopped when that process ends (tests pass their
#       own PID, so nothing outlives them); with --remove as well, DIR is deleted then.
#   tests/garage/cluster.sh bucket DIR NAME   another bucket, allowed for the same key
#   tests/garage/cluster.sh kill-node DIR N   kill -9 node N (1..3)
#   tests/garage/cluster.sh start-node DIR N  start node N again (same config and data);
#       when all three run again, it returns once they are connected to each other
#   tests/garage/cluster.sh stop DIR          stop every node by its PID
#
# Only binds 127.0.0.1. Ten consecutive ports are used from the base port (a free block
# is picked when none is given). Each node's log is DIR/nodeN/log.
set -euo pipefail
cmd=${1:?start|stop|bucket|kill-node|start-node}
dir=${2:?directory}
shift 2
log() { echo "[garage] $*" >&2; }

stop_all() {
  for f in "$1"/node*/pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  sleep 0.3
  for f in "$1"/node*/pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; done
}

start_node() {
  local n=$1/node$2
  # Detached from the caller's pipes: a test reading this script's output must not
  # wait for the servers.
  garage -c "$n/garage.toml" server </dev/null >>"$n/log" 2>&1 &
  echo $! >"$n/pid"
}

g() { garage -c "$dir/node1/garage.toml" "$@"; }

# Wait until every running node is connected to all three and sees the cluster healthy
# (GetClusterHealth). `garage status` on node 1 lists every node as healthy before
# nodes 2 and 3 have connected to the others; requests through them then fail quorum
# or see a partial view for a second or two.
wait_connected() {
  local i out
  for _ in $(seq 1 150); do
    out=""
    for i in 1 2 3; do
      out+=$(garage -c "$dir/node$i/garage.toml" json-api GetClusterHealth 2>/dev/null | tr -d ' \n' || true)
    done
    if [ "$(grep -o '"connectedNodes":3' <<<"$out" | wc -l)" = 3 ] &&
      [ "$(grep -o '"status":"healthy"' <<<"$out" | wc -l)" = 3 ]; then
      return 0
    fi
    sleep 0.2
  done
  log "the nodes did not all connect to each other within 30 s: $out"
  return 1
}

case "$cmd" in
  stop)
    stop_all "$dir"
    exit 0
    ;;
  kill-node)
    n=${1:?node number}
    kill -9 "$(cat "$dir/node$n/pid")" 2>/dev/null || true
    rm -f "$dir/node$n/pid"
    exit 0
    ;;
  start-node)
    n=${1:?node number}
    start_node "$dir" "$n"
    # Once all three run again, they are connected before this returns.
    if [ -f "$dir/node1/pid" ] && [ -f "$dir/node2/pid" ] && [ -f "$dir/node3/pid" ]; then
      wait_connected
    fi
    exit 0
    ;;
  bucket)
    name=${1:?bucket name}
    for _ in $(seq 1 50); do g bucket create "$name" >/dev/null 2>&1 && break; sleep 0.2; done
    g bucket allow --read --write --owner "$name" --key gate >/dev/null
    exit 0
    ;;
  start) ;;
  *)
    log "unknown command $cmd"
    exit 2
    ;;
esac

watch=""
base=""
remove=""
while [ $# -gt 0 ]; do
  case "$1" in
    --watch) watch=$2; shift 2 ;;
    --remove) remove=1; shift ;;
    --base-port) base=$2; shift 2 ;;
    *) log "unknown option $1"; exit 2 ;;
  esac
done

command -v garage >/dev/null || {
  log "garage is not on PATH: cargo install garage --locked --version 2.5.0 (as .ci/run does)"
  exit 1
}

free_base() {
  python3 - <<'PY'
import random, socket
for _ in range(200):
    b = random.randrange(20000, 60000, 10)
    ok = True
    for p in range(b, b + 10):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            ok = False
        finally:
            s.close()
    if ok:
        print(b)
        break
PY
}

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
base=${base:-$(free_base)}
secret=$(openssl rand -hex 32)
for i in 1 2 3; do
  n=$dir/node$i
  mkdir -p "$n/meta" "$n/data"
  rpc=$((base + i * 3 - 3)); s3=$((base + i * 3 - 2)); adm=$((base + i * 3 - 1))
  cat >"$n/garage.toml" <<TOML
metadata_dir = "$n/meta"
data_dir = "$n/data"
db_engine = "lmdb"
metadata_fsync = false
data_fsync = false
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$adm"
TOML
  start_node "$dir" "$i"
done

if [ -n "$watch" ]; then
  # Stop the cluster when the watched process ends.
  (
    while kill -0 "$watch" 2>/dev/null; do sleep 1; done
    stop_all "$dir"
    if [ -n "$remove" ]; then rm -rf "$dir"; fi
  ) </dev/null >/dev/null 2>&1 &
  disown
fi

for _ in $(seq 1 100); do g status >/dev/null 2>&1 && break; sleep 0.1; done
ids=()
for i in 1 2 3; do
  id=""
  for _ in $(seq 1 100); do
    id=$(garage -c "$dir/node$i/garage.toml" node id -q 2>/dev/null) && break
    sleep 0.1
  done
  [ -n "$id" ] || { log "node $i did not start; see $dir/node$i/log"; exit 1; }
  ids+=("$id")
done
for i in 1 2; do g node connect "${ids[$i]}" >/dev/null; done
# Every node knows the others from its config too, so that nodes restarted later (even
# all at once, before they saved their peer lists) find each other again.
peers=$(printf '"%s",' "${ids[@]}"); peers="[${peers%,}]"
for i in 1 2 3; do
  sed -i "s|^rpc_secret = .*|&\nbootstrap_peers = $peers|" "$dir/node$i/garage.toml"
done
for i in 0 1 2; do g layout assign -z "dc$((i + 1))" -c 1G "${ids[$i]%@*}" >/dev/null; done
g layout apply --version 1 >/dev/null
for _ in $(seq 1 100); do g bucket create registry >/dev/null 2>&1 && break; sleep 0.2; done
keyout=$(g key create gate)
kid=$(echo "$keyout" | awk -F': *' 'tolower($1) ~ /key id/ {print $2; exit}')
ksec=$(echo "$keyout" | awk -F': *' 'tolower($1) ~ /secret key/ {print $2; exit}')
[ -n "$kid" ] && [ -n "$ksec" ] || { log "could not read the key from: $keyout"; exit 1; }
g bucket allow --read --write --owner registry --key gate >/dev/null
wait_connected

echo "S3_ENDPOINT=http://127.0.0.1:$((base + 1))"
echo "S3_ENDPOINT_2=http://127.0.0.1:$((base + 4))"
echo "S3_ENDPOINT_3=http://127.0.0.1:$((base + 7))"
echo "S3_REGION=garage"
echo "S3_BUCKET=registry"
echo "S3_ACCESS_KEY_ID=$kid"
echo "S3_SECRET_ACCESS_KEY=$ksec"
echo "GARAGE_PIDS=\"$(cat "$dir"/node1/pid) $(cat "$dir"/node2/pid) $(cat "$dir"/node3/pid)\""
echo "GARAGE_DIR=$dir"
for i in 1 2 3; do echo "GARAGE_CONF_$i=$dir/node$i/garage.toml"; done
