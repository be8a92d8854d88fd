"""Runs llama-cpp-python's OpenAI server on the tiny test model, for tests and benchmarks.

Usage: python3 llama_server.py WORK_DIR [--remove-on-exit] [--cpus LIST] [--threads N]

Writes WORK_DIR/tiny.gguf (make_tiny_model.py), binds 127.0.0.1 port 0 itself (no free-port
race), prints one JSON line {"port": N, "model": PATH} on stdout, then serves until its stdin
closes. The stdin rule is what keeps a test binary from leaking servers: the Rust side holds
the pipe for its whole life (a static), and the kernel closes it when that process exits,
however it exits. With --remove-on-exit it then deletes WORK_DIR too (a static's temporary
directory is never dropped).

--cpus LIST (comma-separated CPU numbers) pins the whole server, its compute threads included, to
those CPUs before the model loads; --threads N sets llama.cpp's threads for decoding and for
prompt processing (`n_threads`, `n_threads_batch`; llama-cpp-python's defaults are half the
machine's CPUs and all of them). A benchmark needs both: on a small machine llama.cpp's threads
otherwise take every CPU while they decode, and the gateway being measured runs only between
tokens.

The server is the same one `python -m llama_cpp.server --model tiny.gguf --model_alias tiny
--n_ctx 2048 --embedding true --interrupt_requests false --port P --host 127.0.0.1` starts; it is
assembled here only so that it can serve an already bound socket.
"""
import json
import os
import shutil
import socket
import sys
import threading

# The model writer sits next to this file; importing it must not leave a __pycache__ in the
# source tree.
sys.dont_write_bytecode = True
import make_tiny_model  # noqa: E402


def watch_stdin(remove):
    # EOF on stdin means whoever started us is gone: leave at once, without cleanup that
    # could hang on a request in progress.
    sys.stdin.buffer.read()
    if remove:
        shutil.rmtree(remove, ignore_errors=True)
    os._exit(0)


USAGE = "usage: llama_server.py WORK_DIR [--remove-on-exit] [--cpus LIST] [--threads N]"


def parse_args(argv):
    """(work_dir, remove, cpus or None, threads or None); exits with the usage on anything else."""
    remove, cpus, threads, rest = False, None, None, []
    it = iter(argv)
    try:
        for a in it:
            if a == "--remove-on-exit":
                remove = True
            elif a == "--cpus":
                cpus = {int(c) for c in next(it).split(",") if c.strip()}
                if not cpus:
                    raise ValueError("--cpus names no CPU")
            elif a == "--threads":
                threads = int(next(it))
                if threads < 1:
                    raise ValueError("--threads must be at least 1")
            else:
                rest.append(a)
    except (StopIteration, ValueError) as e:
        print(f"{USAGE}\n{e}", file=sys.stderr)
        sys.exit(2)
    if len(rest) != 1:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    return rest[0], remove, cpus, threads


def listening_socket():
    """A TCP socket listening on 127.0.0.1, port 0, whose connections get TCP_NODELAY.

    asyncio sets TCP_NODELAY on a connection only when its socket's protocol is IPPROTO_TCP,
    and a socket made as socket(AF_INET, SOCK_STREAM) has protocol 0, as do the connections
    accepted from it. Without TCP_NODELAY the server's streamed chunks wait for the client's
    delayed ACK (40 ms on Linux) and then arrive all at once: a stream relayed through the
    gateway got every token of a reply in one read, 40 ms late. `python -m llama_cpp.server`
    lets uvicorn bind its socket from getaddrinfo (protocol 6), so the real server streams
    token by token; so must this one. Linux also copies TCP_NODELAY from a listening socket
    to what it accepts, which is set too.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def main():
    work_dir, remove, cpus, threads = parse_args(sys.argv[1:])
    if cpus is not None:
        # Every thread that exists now (numpy's BLAS pool started at import) is pinned, and the
        # model is not loaded yet, so every thread llama.cpp or the server starts inherits it.
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cpus)
    sys.argv[1:] = [work_dir]
    os.makedirs(sys.argv[1], exist_ok=True)
    model = os.path.join(sys.argv[1], "tiny.gguf")
    make_tiny_model.write(model)

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    sock = listening_socket()
    port = sock.getsockname()[1]

    app = create_app(
        server_settings=ServerSettings(host="127.0.0.1", port=port, interrupt_requests=False),
        model_settings=[
            ModelSettings(
                model=model,
                model_alias="tiny",
                n_ctx=2048,
                embedding=True,
                verbose=False,
                **({"n_threads": threads, "n_threads_batch": threads} if threads else {}),
            )
        ],
    )
    threading.Thread(target=watch_stdin, args=(sys.argv[1] if remove else None,), daemon=True).start()
    print(json.dumps({"port": port, "model": model}), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
