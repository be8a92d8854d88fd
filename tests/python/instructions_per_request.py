"""Instructions the gateway executes per non-streaming chat request, counted with callgrind.

Usage: python3 instructions_per_request.py BENCH [--requests N] [--warmup N] [--tokens N]
           [--out DIR] [--label NAME]

BENCH is a `bench` binary (tests/src/bin/bench.rs, built with the same flags for every
binary compared). Its hidden `serve-gateway` runs under `valgrind --tool=callgrind` with
instrumentation off (a current-thread runtime, the SQLite ledger in a temporary directory); its
`serve-nodes` runs one simulator node with no delay, natively. This script then sends
`--warmup` requests, switches collection on, sends `--requests` requests one after another on
one keep-alive connection (the same body as `bench inference-rps`), dumps, and prints the
gateway's instructions (all its threads: runtime, ledger writer, timers) divided by the
requests, as one JSON line, and the runtime thread's share alone (steadier: the ledger
writer's share depends on how many records each commit happens to batch). Instruction counts do not depend on the machine's load, so two
builds can be compared on a busy machine; requests per second cannot.

The callgrind profile stays in --out (default: a temporary directory, printed) for
`callgrind_annotate`.
"""
import argparse
import glob
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

BODY = json.dumps(
    {
        "model": "m",
        "stream": False,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Benchmark prompt: say something."}],
    }
)


def ready_line(proc, what, within_s):
    """The first stdout line of `proc` as JSON (its ready line), within `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            return json.loads(line)
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
    raise SystemExit(f"{what} printed no ready line within {within_s} s")


def total_ir(out_dir, pid):
    """(all threads' Ir, thread 1's Ir, files) over the dump of `pid` (one file per thread)."""
    total, main_thread = 0, 0
    files = glob.glob(os.path.join(out_dir, f"callgrind.out.{pid}.1-*"))
    for f in files:
        with open(f) as fh:
            for line in fh:
                if line.startswith("totals:") or line.startswith("summary:"):
                    n = int(line.split()[1])
                    total += n
                    if f.endswith("-01"):
                        main_thread += n
                    break
    return total, main_thread, files


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bench")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="callgrind-")
    os.makedirs(out, exist_ok=True)
    store = tempfile.mkdtemp(prefix="ipr-store-")
    body = BODY.replace('"max_tokens": 16', f'"max_tokens": {a.tokens}')

    gw = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--separate-threads=yes",
            f"--callgrind-out-file={out}/callgrind.out.%p",
            a.bench,
            "serve-gateway",
            "--threads",
            "0",
            "--store-dir",
            store,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    nodes = None
    try:
        info = ready_line(gw, "the gateway (under valgrind)", 300)
        nodes = subprocess.Popen(
            [
                a.bench,
                "serve-nodes",
                "--gateway-quic",
                info["quic"],
                "--sha256",
                info["sha256"],
                "--token",
                info["token"],
                "--capacity",
                "64",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        ready_line(nodes, "the node", 300)
        host, port = info["http"].rsplit(":", 1)
        headers = {
            "content-type": "application/json",
            "authorization": f"Bearer {info['api_key']}",
        }

        def one(conn):
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise SystemExit(f"request answered {r.status}: {data[:300]!r}")
            return data

        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        # The node registers asynchronously: the first requests may find no node yet.
        deadline = time.monotonic() + 120
        while True:
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"no 200 from the gateway within 120 s (last {r.status})")
            time.sleep(0.2)
        for _ in range(a.warmup):
            one(conn)
        subprocess.run(["callgrind_control", "-i", "on", str(gw.pid)], check=True,
                       stdout=subprocess.DEVNULL)
        start = time.monotonic()
        for _ in range(a.requests):
            one(conn)
        elapsed = time.monotonic() - start
        subprocess.run(["callgrind_control", "-d", str(gw.pid)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["callgrind_control", "-i", "off", str(gw.pid)], check=True,
                       stdout=subprocess.DEVNULL)
        total, main_thread, files = total_ir(out, gw.pid)
        print(
            json.dumps(
                {
                    "label": a.label,
                    "bench": a.bench,
                    "requests": a.requests,
                    "instructions": total,
                    "instructions_per_request": round(total / a.requests),
                    # The runtime's thread alone: steadier than the total, whose ledger-writer
                    # share depends on how many records each commit happens to batch.
                    "runtime_thread_per_request": round(main_thread / a.requests),
                    "seconds_under_valgrind": round(elapsed, 1),
                    "profiles": sorted(files),
                }
            ),
            flush=True,
        )
    finally:
        for p in (nodes, gw):
            if p is not None:
                p.stdin.close()
        for p in (nodes, gw):
            if p is not None:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    sys.exit(main())
