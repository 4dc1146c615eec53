#!/usr/bin/env bash
# `make bench-count`: what one proxied tools/call costs the proxy, in counts that do not
# depend on how busy the machine is: user-space instructions (valgrind --tool=callgrind)
# and system calls (strace -c -f), per call.
#
# Each count runs the process twice under the tool, in front of mock-mcp, with one
# mcp-load session (keep-alive HTTP/1.1: initialize, notifications/initialized, then
# tools/call echo in a closed loop, as in `make bench-proxy`): once for BASE calls and once
# for BASE + CALLS calls, each process started fresh and stopped with SIGTERM (a clean
# shutdown, so the tool writes its totals). Per call = (second total - first total) / CALLS:
# start-up, the session's set-up and shutdown cancel out. The byte relay (tcp-relay) is
# counted the same way as the floor. Instruction counts are exact for a given binary
# (±0.5 % from timer ticks while idle); syscall counts are exact up to how many epoll_wait /
# futex calls a wake-up takes, which depends on thread timing (a few % between runs).
#
# Environment: BENCH_COUNT_CALLS (2000), BENCH_COUNT_BASE (200), BENCH_COUNT_SESSIONS (1: calls
# are spread over that many concurrent sessions; multiples of it), BENCH_PROXY_BIN (another
# toolgate-proxy binary), BENCH_NO_BUILD=1 (skip cargo build), BENCH_COUNT_OUT
# (target/bench-count.json), BENCH_COUNT_SKIP_RELAY=1, BENCH_PROXY_ARGS (extra flags),
# BENCH_COUNT_KEEP=DIR (keep the callgrind and strace outputs there, for callgrind_annotate).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CALLS=${BENCH_COUNT_CALLS:-2000}
BASE=${BENCH_COUNT_BASE:-200}
SESSIONS=${BENCH_COUNT_SESSIONS:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
PROXY_BIN=${BENCH_PROXY_BIN:-$BIN/toolgate-proxy}
OUT=${BENCH_COUNT_OUT:-$TARGET_DIR/bench-count.json}
read -r -a EXTRA <<<"${BENCH_PROXY_ARGS:-}"

for tool in valgrind strace; do
  command -v "$tool" >/dev/null || { echo "bench-count needs $tool (apt-get install $tool)" >&2; exit 1; }
done
if [[ -z ${BENCH_NO_BUILD:-} ]]; then
  echo "building release binaries (toolgate-proxy, mock-mcp, mcp-load, tcp-relay)..."
  cargo build --release --locked --quiet -p toolgate-proxy -p toolgate-bench --bins
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-count.XXXXXX")
PIDS=()
cleanup() {
  local p
  [[ -z ${BENCH_COUNT_KEEP:-} ]] || { mkdir -p "$BENCH_COUNT_KEEP" && cp "$WORK"/*.cg "$WORK"/*.st "$BENCH_COUNT_KEEP"/ 2>/dev/null || true; }
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port: one definition for both benchmark scripts.
source bench/ports.sh

"$BIN/mock-mcp" 0 >"$WORK/mock.out" 2>"$WORK/mock.err" &
PIDS+=($!)
for _ in $(seq 1 100); do grep -q '^LISTENING ' "$WORK/mock.out" 2>/dev/null && break; sleep 0.05; done
MOCK_PORT=$(awk '/^LISTENING/ {print $2; exit}' "$WORK/mock.out")
[[ -n $MOCK_PORT ]] || { cat "$WORK/mock.err" >&2; exit 1; }

# Waits until something accepts connections on the port (the tools slow start-up down).
wait_port() { # port pid
  local i
  for i in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# Runs `what` (proxy | relay) under `tool` (callgrind | strace) for `calls` calls and
# prints the tool's total (instructions, or system calls).
one() { # tool what calls
  local tool=$1 what=$2 calls=$3 port pid out cmd=()
  out="$WORK/$tool-$what-$calls"
  port=$(free_port)
  case $tool in
    callgrind) cmd=(valgrind --tool=callgrind --callgrind-out-file="$out.cg" --log-file="$out.vg") ;;
    strace) cmd=(strace -f -c -o "$out.st") ;;
  esac
  case $what in
    proxy)
      TOOLGATE_LOG=warn "${cmd[@]}" "$PROXY_BIN" --policy bench/policy.yaml \
        --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$(free_port)" \
        --upstream "http://127.0.0.1:$MOCK_PORT/mcp" "${EXTRA[@]}" >"$out.audit" 2>"$out.err" &
      ;;
    relay)
      "${cmd[@]}" "$BIN/tcp-relay" "127.0.0.1:$MOCK_PORT" --port "$port" >"$out.audit" 2>"$out.err" &
      ;;
  esac
  pid=$!
  PIDS+=("$pid")
  wait_port "$port" "$pid" || { echo "$what under $tool did not start" >&2; cat "$out.err" >&2; return 1; }
  "$BIN/mcp-load" run --sessions "$SESSIONS" --warmup-secs 0 --secs 600 --count "$((calls / SESSIONS))" \
    --url "http://127.0.0.1:$port/mcp" --auth "Bearer bench-token" >"$out.load" ||
    { echo "load through $what under $tool failed" >&2; cat "$out.load" "$out.err" >&2; return 1; }
  # The process must still be running: one that exited (a port another program took
  # between free_port and its bind) would leave the load counted against someone else.
  kill -0 "$pid" 2>/dev/null || { echo "$what under $tool exited before its load ended (port clash?)" >&2; cat "$out.err" >&2; return 1; }
  # Under strace the process is strace's child: stop the child, strace then writes its
  # summary and exits. Under valgrind the process is the one started.
  local target
  target=$(pgrep -P "$pid" | head -n 1 || true)
  kill -TERM "${target:-$pid}"
  wait "$pid" 2>/dev/null || true
  case $tool in
    callgrind) awk '/^(summary|totals):/ {print $2; exit}' "$out.cg" ;;
    strace) awk '/^ *[0-9]/ && $NF != "total" {n += $4} END {print n}' "$out.st" ;;
  esac
}

# Per-call difference, and (for strace) the per-call breakdown by system call.
per_call() { # tool what
  local a b
  a=$(one "$1" "$2" "$BASE")
  b=$(one "$1" "$2" "$((BASE + CALLS))")
  awk -v a="$a" -v b="$b" -v n="$CALLS" 'BEGIN {printf "%.1f", (b - a) / n}'
}

breakdown() { # what
  local a="$WORK/strace-$1-$BASE.st" b="$WORK/strace-$1-$((BASE + CALLS)).st"
  awk -v n="$CALLS" '
    FNR == 1 { file++ }
    /^ *[0-9]/ && $NF != "total" { cnt[file, $NF] = $4; names[$NF] = 1 }
    END { for (s in names) { d = (cnt[2, s] - cnt[1, s]) / n; if (d >= 0.05 || d <= -0.05) printf "%s %.2f\n", s, d } }
  ' "$a" "$b" | sort -k2 -nr | awk '{printf "%s%s=%s", (NR > 1 ? " " : ""), $1, $2} END {print ""}'
}

echo "counting over $CALLS calls (minus a $BASE-call run), $SESSIONS session(s)..."
P_IR=$(per_call callgrind proxy)
P_SC=$(per_call strace proxy)
P_BD=$(breakdown proxy)
R_IR=null R_SC=null R_BD=""
if [[ -z ${BENCH_COUNT_SKIP_RELAY:-} ]]; then
  R_IR=$(per_call callgrind relay)
  R_SC=$(per_call strace relay)
  R_BD=$(breakdown relay)
fi
printf '%-16s %14s %12s   %s\n' "" "instr./call" "syscalls/call" "syscalls by name"
printf '%-16s %14s %12s   %s\n' toolgate-proxy "$P_IR" "$P_SC" "$P_BD"
[[ $R_IR == null ]] || printf '%-16s %14s %12s   %s\n' tcp-relay "$R_IR" "$R_SC" "$R_BD"
mkdir -p "$(dirname "$OUT")"
cat >"$OUT" <<EOF
{"calls": $CALLS, "base_calls": $BASE, "sessions": $SESSIONS, "proxy_bin": "$PROXY_BIN",
 "proxy": {"instructions_per_call": $P_IR, "syscalls_per_call": $P_SC, "syscalls": "$P_BD"},
 "relay": {"instructions_per_call": $R_IR, "syscalls_per_call": $R_SC, "syscalls": "$R_BD"}}
EOF
echo "wrote $OUT"
