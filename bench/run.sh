#!/usr/bin/env bash
# `make bench-proxy`: toolgate-proxy against a direct connection to the same upstream.
#
# Builds the release binaries, starts mock-mcp (the upstream), toolgate-proxy in front of
# it, tcp-relay (a byte-copying relay: the floor any process in the path pays), a peer MCP
# proxy when one is installed (mcp-proxy 0.6.0, pass-through) and, when redis-server is
# installed, a second toolgate-proxy counting its limits in a Redis on loopback. Then runs
# mcp-load for 1 and 8 sessions directly, through the relay, the proxy, the peer and the
# Redis-backed proxy, interleaved (direct-1, relay-1, proxy-1, peer-1, redis-1, direct-8,
# …) so slow drift of a shared machine hits all sides alike. The CPU time (user + system,
# /proc/<pid>/stat) each process in the path used during each run is divided by the run's
# calls. Proxy RSS is read from /proc/<pid>/status: idle (after start, before any load),
# peak (sampled every 100 ms during the 8-session proxied run) and after. Redis round trips
# per limited call: the EVALSHA/EVAL/SCRIPT commands of INFO commandstats, before and after
# the redis runs. Prints a table and writes target/bench-proxy.json. Every process started here is
# stopped on exit.
#
# Environment:
#   BENCH_WARMUP_SECS (5)  BENCH_SECS (10)   warm-up and measured time of each run
#   BENCH_LOAD_THREADS (1) BENCH_MOCK_THREADS (1)  runtime threads of mcp-load / mock-mcp
#   BENCH_PIN=1            pin: mcp-load + mock-mcp on CPU 0, the proxies on CPU 1 (taskset)
#   BENCH_OUT (target/bench-proxy.json)   BENCH_NO_BUILD=1  skip cargo build
#   BENCH_PROXY_BIN        another toolgate-proxy binary to measure (e.g. a saved older build)
#   BENCH_PEER_BIN (mcp-proxy on PATH)    BENCH_NO_PEER=1   skip the peer
#   BENCH_NO_REDIS=1       skip the redis scenario
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

WARMUP=${BENCH_WARMUP_SECS:-5}
SECS=${BENCH_SECS:-10}
LOAD_THREADS=${BENCH_LOAD_THREADS:-1}
MOCK_THREADS=${BENCH_MOCK_THREADS:-1}
OUT=${BENCH_OUT:-target/bench-proxy.json}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
PROXY_BIN=${BENCH_PROXY_BIN:-$BIN/toolgate-proxy}

if [[ -z ${BENCH_NO_BUILD:-} ]]; then
  echo "building release binaries (toolgate-proxy, mock-mcp, mcp-load, tcp-relay)..."
  cargo build --release --locked --quiet -p toolgate-proxy -p toolgate-bench \
    --bin toolgate-proxy --bin mock-mcp --bin mcp-load --bin tcp-relay
fi

PIN_LOAD=() PIN_PROXY=()
if [[ -n ${BENCH_PIN:-} ]] && command -v taskset >/dev/null && (($(nproc) >= 2)); then
  PIN_LOAD=(taskset -c 0) PIN_PROXY=(taskset -c 1)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-proxy.XXXXXX")
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# The anonymous part of the RSS (heap, stacks): what the proxy itself allocated. The rest
# is file-backed: pages of the binary's code the kernel mapped (shared, clean, reclaimable).
anon_kib() { awk '/^RssAnon:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# CPU time (user + system, all threads) of a process so far, in clock ticks.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0; }
TICK=$(getconf CLK_TCK)

# free_port: one definition for both benchmark scripts.
source bench/ports.sh

# Waits for a started benchmark tool to print "LISTENING <port>" (its stdout and stderr are
# $WORK/<name>.out and .err) and prints the port; shows its stderr and fails if it exits
# first or never says where it listens.
listening_port() { # name pid
  local _ port
  for _ in $(seq 1 100); do
    grep -q '^LISTENING ' "$WORK/$1.out" 2>/dev/null && break
    kill -0 "$2" 2>/dev/null || { cat "$WORK/$1.err" >&2; return 1; }
    sleep 0.05
  done
  port=$(awk '/^LISTENING/ {print $2; exit}' "$WORK/$1.out")
  [[ -n $port ]] || { echo "$1 did not start" >&2; return 1; }
  echo "$port"
}

# --- upstream ---------------------------------------------------------------------------
"${PIN_LOAD[@]}" "$BIN/mock-mcp" 0 --threads "$MOCK_THREADS" >"$WORK/mock-mcp.out" 2>"$WORK/mock-mcp.err" &
PIDS+=($!)
MOCK_PID=$!
MOCK_PORT=$(listening_port mock-mcp "$MOCK_PID")

# --- byte relay (floor) ----------------------------------------------------------------
"${PIN_PROXY[@]}" "$BIN/tcp-relay" "127.0.0.1:$MOCK_PORT" >"$WORK/tcp-relay.out" 2>"$WORK/tcp-relay.err" &
PIDS+=($!)
RELAY_PID=$!
RELAY_PORT=$(listening_port tcp-relay "$!")

# --- proxy ------------------------------------------------------------------------------
PROXY_PORT=${BENCH_PROXY_PORT:-$(free_port)}
ADMIN_PORT=${BENCH_ADMIN_PORT:-$(free_port)}
# Audit lines (stdout) go through a pipe, as to a container runtime; they are counted.
TOOLGATE_LOG=warn "${PIN_PROXY[@]}" "$PROXY_BIN" \
  --policy bench/policy.yaml \
  --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
  --upstream "http://127.0.0.1:$MOCK_PORT/mcp" \
  > >(wc -l >"$WORK/audit.count") 2>"$WORK/proxy.err" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
for i in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$PROXY_PID" 2>/dev/null || { cat "$WORK/proxy.err" >&2; exit 1; }
  ((i < 100)) || { echo "toolgate-proxy not ready" >&2; cat "$WORK/proxy.err" >&2; exit 1; }
  sleep 0.05
done
sleep 1
RSS_IDLE=$(rss_kib "$PROXY_PID")
ANON_IDLE=$(anon_kib "$PROXY_PID")

# --- peer: mcp-proxy 0.6.0, pass-through (no auth, limits, filters or cache) ------------
PEER_BIN=${BENCH_PEER_BIN:-$(command -v mcp-proxy || true)}
PEER_PID="" PEER_URL=""
if [[ -z ${BENCH_NO_PEER:-} && -n $PEER_BIN && -x $PEER_BIN ]]; then
  PEER_PORT=$(free_port)
  printf '%s\n' '[proxy]' 'name = "bench"' '[proxy.listen]' 'host = "127.0.0.1"' "port = $PEER_PORT" \
    '[[backends]]' 'name = "mock"' 'transport = "http"' "url = \"http://127.0.0.1:$MOCK_PORT/mcp\"" \
    >"$WORK/peer.toml"
  RUST_LOG=warn "${PIN_PROXY[@]}" "$PEER_BIN" --config "$WORK/peer.toml" >"$WORK/peer.out" 2>"$WORK/peer.err" &
  PEER_PID=$!
  PIDS+=("$PEER_PID")
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PEER_PORT") 2>/dev/null && break
    kill -0 "$PEER_PID" 2>/dev/null || { echo "mcp-proxy exited:" >&2; cat "$WORK/peer.err" >&2; exit 1; }
    ((i < 100)) || { echo "mcp-proxy not listening" >&2; exit 1; }
    sleep 0.05
  done
  # It serves MCP at / and names the backend's tools `<backend>/<tool>`.
  PEER_URL=http://127.0.0.1:$PEER_PORT/
  PEER_VERSION=$("$PEER_BIN" --version 2>/dev/null || echo "mcp-proxy")
fi

# --- toolgate-proxy counting in Redis -----------------------------------------------------
REDIS_PID="" REDIS_PROXY_PID="" REDIS_URL_MCP=""
if [[ -z ${BENCH_NO_REDIS:-} ]] && command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
  REDIS_PORT=$(free_port)
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --daemonize no \
    >"$WORK/redis.out" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  for i in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    ((i < 100)) || { echo "redis-server did not start" >&2; cat "$WORK/redis.out" >&2; exit 1; }
    sleep 0.05
  done
  RPROXY_PORT=$(free_port)
  RADMIN_PORT=$(free_port)
  TOOLGATE_LOG=warn "${PIN_PROXY[@]}" "$PROXY_BIN" \
    --policy bench/policy.yaml \
    --listen "127.0.0.1:$RPROXY_PORT" --admin-listen "127.0.0.1:$RADMIN_PORT" \
    --upstream "http://127.0.0.1:$MOCK_PORT/mcp" --counter-store "redis://127.0.0.1:$REDIS_PORT" \
    >/dev/null 2>"$WORK/rproxy.err" &
  REDIS_PROXY_PID=$!
  PIDS+=("$REDIS_PROXY_PID")
  for i in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$RADMIN_PORT/readyz" >/dev/null 2>&1 && break
    kill -0 "$REDIS_PROXY_PID" 2>/dev/null || { cat "$WORK/rproxy.err" >&2; exit 1; }
    ((i < 100)) || { echo "toolgate-proxy (redis) not ready" >&2; cat "$WORK/rproxy.err" >&2; exit 1; }
    sleep 0.05
  done
  REDIS_URL_MCP=http://127.0.0.1:$RPROXY_PORT/mcp
fi
# Round trips to Redis so far: the commands clients sent (EVALSHA, EVAL, SCRIPT). The
# commands the scripts run inside Redis are counted by commandstats too, under their own
# names, and the store monitor's PING is not per call: both are left out.
redis_commands() {
  redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' |
    awk -F'[:=,]' '$1 ~ /^cmdstat_(evalsha|evalsha_ro|eval|eval_ro|script)$/ {n += $3} END {print n + 0}'
}

MACHINE="$(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)), $(uname -sr), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "machine: $MACHINE"
echo "mock-mcp :$MOCK_PORT (pid $MOCK_PID), tcp-relay :$RELAY_PORT, toolgate-proxy :$PROXY_PORT admin :$ADMIN_PORT (pid $PROXY_PID), idle RSS ${RSS_IDLE} KiB"
echo "each run: ${WARMUP}s warm-up + ${SECS}s measured"

CPU_ARGS=()
load() { # name sessions url [pid of the process in the path] [mcp-load args...]
  local name=$1 sessions=$2 url=$3 pid=${4:-} before=0 after
  shift $(($# < 4 ? $# : 4))
  echo "  $name ..."
  [[ -z $pid ]] || before=$(cpu_ticks "$pid")
  "${PIN_LOAD[@]}" "$BIN/mcp-load" run --label "$name" --sessions "$sessions" --url "$url" \
    --warmup-secs "$WARMUP" --secs "$SECS" --threads "$LOAD_THREADS" \
    --auth "Bearer bench-token" "$@" >"$WORK/$name.json"
  if [[ -n $pid ]]; then
    after=$(cpu_ticks "$pid")
    CPU_ARGS+=(--cpu "$name=$(awk -v a="$before" -v b="$after" -v t="$TICK" 'BEGIN {printf "%.2f", (b - a) / t}')")
  fi
}
DIRECT=http://127.0.0.1:$MOCK_PORT/mcp
PROXIED=http://127.0.0.1:$PROXY_PORT/mcp
RELAYED=http://127.0.0.1:$RELAY_PORT/mcp
[[ -z $REDIS_PID ]] || REDIS_BEFORE=$(redis_commands)

for n in 1 8; do
  load "direct-$n" "$n" "$DIRECT"
  load "relay-$n" "$n" "$RELAYED" "$RELAY_PID"
  if ((n == 8)); then
    # The 8-session proxied run, with the RSS sampled while it runs.
    echo 0 >"$WORK/rss.peak"
    echo 0 >"$WORK/anon.peak"
    (
      peak=0 apeak=0
      while kill -0 "$PROXY_PID" 2>/dev/null && [[ ! -e $WORK/load.done ]]; do
        r=$(rss_kib "$PROXY_PID")
        ((r > peak)) && peak=$r && echo "$peak" >"$WORK/rss.peak"
        r=$(anon_kib "$PROXY_PID")
        ((r > apeak)) && apeak=$r && echo "$apeak" >"$WORK/anon.peak"
        sleep 0.1
      done
    ) &
    SAMPLER=$!
    PIDS+=("$SAMPLER")
  fi
  load "proxy-$n" "$n" "$PROXIED" "$PROXY_PID"
  if ((n == 8)); then
    touch "$WORK/load.done"
    wait "$SAMPLER" 2>/dev/null || true
  fi
  [[ -z $PEER_PID ]] || load "peer-$n" "$n" "$PEER_URL" "$PEER_PID" --tool mock/echo
  [[ -z $REDIS_PROXY_PID ]] || load "redis-$n" "$n" "$REDIS_URL_MCP" "$REDIS_PROXY_PID"
done
RSS_LOAD=$(cat "$WORK/rss.peak")
ANON_LOAD=$(cat "$WORK/anon.peak")
RSS_AFTER=$(rss_kib "$PROXY_PID")
EXTRA=()
if [[ -n $PEER_PID ]]; then
  EXTRA+=(--peer-1 "$WORK/peer-1.json" --peer-8 "$WORK/peer-8.json" --peer-name peer)
fi
if [[ -n $REDIS_PID ]]; then
  EXTRA+=(--redis-1 "$WORK/redis-1.json" --redis-8 "$WORK/redis-8.json"
    --redis-commands "$(($(redis_commands) - REDIS_BEFORE))")
fi

# Stop the proxy so its audit pipe closes and the line count is final.
kill "$PROXY_PID" 2>/dev/null || true
wait "$PROXY_PID" 2>/dev/null || true
for _ in $(seq 1 50); do [[ -s $WORK/audit.count ]] && break; sleep 0.05; done
AUDIT=$(tr -d ' ' <"$WORK/audit.count" 2>/dev/null || echo 0)

mkdir -p "$(dirname "$OUT")"
"$BIN/mcp-load" report \
  --direct-1 "$WORK/direct-1.json" --proxy-1 "$WORK/proxy-1.json" \
  --direct-8 "$WORK/direct-8.json" --proxy-8 "$WORK/proxy-8.json" \
  --relay-1 "$WORK/relay-1.json" --relay-8 "$WORK/relay-8.json" "${EXTRA[@]}" "${CPU_ARGS[@]}" \
  --rss-idle-kib "$RSS_IDLE" --rss-load-kib "$RSS_LOAD" --rss-after-kib "$RSS_AFTER" \
  --audit-lines "${AUDIT:-0}" --machine "$MACHINE" --out "$OUT"
awk -v i="$ANON_IDLE" -v p="$ANON_LOAD" 'BEGIN {printf "toolgate-proxy anonymous RSS (heap, stacks): idle %.1f MiB, peak %.1f MiB (the rest of the RSS is file-backed code pages)\n", i / 1024, p / 1024}'
echo "audit lines written by the proxy: ${AUDIT:-0} (one per decided tools/call, warm-up included)"
[[ -z $PEER_PID ]] || echo "peer: $PEER_VERSION ($PEER_BIN), pass-through configuration"
