"""Run llama.cpp's HTTP server in-process (the prebuilt xllamacpp wheel) until SIGTERM.

    python scripts/llama_server.py MODEL.gguf PORT ALIAS

Used by the real-engine tests as an OpenAI-compatible backend (no /api/* routes).
"""

from __future__ import annotations

import signal
import sys
import threading

import xllamacpp  # type: ignore[import-not-found]


def main() -> None:
    model, port, alias = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    params = xllamacpp.CommonParams()
    params.model.path = model
    params.model_alias = {alias}
    params.n_ctx = 2048
    params.n_parallel = 1
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    params.hostnames = ["127.0.0.1"]
    params.port = port
    server = xllamacpp.Server(params)
    print("listening", server.listening_address, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    main()
