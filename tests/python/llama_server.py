"""Runs llama-cpp-python's OpenAI server on the tiny test model, for tests and benchmarks.

Usage: python3 llama_server.py WORK_DIR [--remove-on-exit]

Writes WORK_DIR/tiny.gguf (make_tiny_model.py), binds 127.0.0.1 port 0 itself (no free-port
race), prints one JSON line {"port": N, "model": PATH} on stdout, then serves until its stdin
closes. The stdin rule is what keeps a test binary from leaking servers: the Rust side holds
the pipe for its whole life (a static), and the kernel closes it when that process exits,
however it exits. With --remove-on-exit it then deletes WORK_DIR too (a static's temporary
directory is never dropped).

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


def main():
    args = sys.argv[1:]
    remove = "--remove-on-exit" in args
    args = [a for a in args if a != "--remove-on-exit"]
    if len(args) != 1:
        print("usage: llama_server.py WORK_DIR [--remove-on-exit]", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = args
    os.makedirs(sys.argv[1], exist_ok=True)
    model = os.path.join(sys.argv[1], "tiny.gguf")
    make_tiny_model.write(model)

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
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
            )
        ],
    )
    threading.Thread(target=watch_stdin, args=(sys.argv[1] if remove else None,), daemon=True).start()
    print(json.dumps({"port": port, "model": model}), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
