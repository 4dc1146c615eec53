#!/usr/bin/env python3
"""Loopback TCP ping-pong between two processes: the cost of one hop on this machine.

    python3 bench/pingpong.py              # processes wherever the scheduler puts them
    taskset -c 0 python3 bench/pingpong.py # both on one CPU (no idle-CPU wake-ups)

Sends 1 byte and waits for it to come back, 20 000 times (the first 2 000 are warm-up);
prints p50/p99 of the round trip. A proxy adds at least one such round trip's worth of
hops and wake-ups to every call (docs/benchmarks.md).
"""
import os
import socket
import sys
import time

ROUNDS, WARMUP = 20_000, 2_000

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
port = listener.getsockname()[1]

if os.fork() == 0:  # the echoing peer
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(64):
        conn.sendall(data)
    os._exit(0)

client = socket.create_connection(("127.0.0.1", port))
client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
samples = []
for _ in range(ROUNDS):
    t = time.perf_counter_ns()
    client.sendall(b"x")
    if not client.recv(64):
        sys.exit("the peer closed the connection")
    samples.append(time.perf_counter_ns() - t)
client.close()
os.wait()
samples = sorted(samples[WARMUP:])
p = lambda q: samples[min(len(samples) - 1, int(len(samples) * q))] / 1000
print(f"loopback ping-pong: p50 {p(0.50):.1f} µs  p99 {p(0.99):.1f} µs  ({len(samples)} round trips)")
