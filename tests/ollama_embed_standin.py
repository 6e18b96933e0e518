"""A stand-in for Ollama, which cannot run here: an HTTP server on loopback that answers
`POST /api/embed` as Ollama's server does.

What it mirrors of Ollama: the request body ({"model", "input": a string or a list of strings,
"truncate", "options", "keep_alive"}), the answer ({"model", "embeddings", "total_duration",
"load_duration", "prompt_eval_count"}) with unit-length vectors, the model names with or without
the `:latest` tag, and the errors: 400 {"error": "missing request body"} / {"error": "invalid
input type"}, 404 {"error": "model \"x\" not found, try pulling it first"} for a model never
pulled. The models it serves are given to it as functions that compute real embeddings.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EmbedFunction = Callable[[list[str]], list[list[float]]]


class OllamaStandIn:
    def __init__(self, models: dict[str, EmbedFunction]) -> None:
        self.models = {self._tagged(name): embed for name, embed in models.items()}
        self.requests: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="ollama-standin", daemon=True)

    @property
    def host(self) -> str:
        """As OLLAMA_HOST is usually written: host:port, no scheme."""
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> OllamaStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @staticmethod
    def _tagged(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet, as a test server should be
                pass

            def do_POST(self) -> None:
                if self.path != "/api/embed":
                    return self._reply(404, b"404 page not found")
                started = time.monotonic_ns()
                length = int(self.headers.get("Content-Length") or 0)
                if length == 0:
                    return self._reply(400, {"error": "missing request body"})
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError as exc:
                    return self._reply(400, {"error": str(exc)})
                standin.requests.append(body)
                raw_input = body.get("input")
                if isinstance(raw_input, str):
                    texts = [raw_input] if raw_input else []
                elif isinstance(raw_input, list) and all(isinstance(t, str) for t in raw_input):
                    texts = raw_input
                elif raw_input is None:
                    texts = []
                else:
                    return self._reply(400, {"error": "invalid input type"})
                model = str(body.get("model") or "")
                embed = standin.models.get(standin._tagged(model)) if model else None
                if embed is None:
                    return self._reply(404, {"error": f'model "{model}" not found, try pulling it first'})
                loaded = time.monotonic_ns()
                vectors = [_unit(v) for v in embed(texts)] if texts else []
                self._reply(
                    200,
                    {
                        "model": model,
                        "embeddings": vectors,
                        "total_duration": time.monotonic_ns() - started,
                        "load_duration": loaded - started,
                        "prompt_eval_count": sum(len(t.split()) for t in texts),
                    },
                )

            def _reply(self, status: int, body: dict | bytes) -> None:
                # Ollama's router answers unknown paths in plain text, its handlers in JSON.
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                content_type = "text/plain" if isinstance(body, bytes) else "application/json; charset=utf-8"
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
