"""The Ollama and OpenAI APIs in the router's shapes (`core.models.api`), and back.

Requests become a `ChatAsk` (or texts to embed); answers, deltas and `ModelError`s become what
each API's clients expect: Ollama's objects and NDJSON lines (streaming is its default),
OpenAI's chat completions, `chat.completion.chunk` SSE events ending in `data: [DONE]`,
embeddings (floats, or base64 float32 as the official client asks by default) and error objects.
Only what the router can honour is read: text messages, temperature, the token limit, stop
sequences and a JSON schema (Ollama `format`, OpenAI `response_format`); other fields are ignored,
as the APIs' own servers ignore what a model does not support.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from core.models.api import ChatAnswer, ChatAsk, Embeddings, ModelError, ModelInfo

DEFAULT_NAMES = ("", "default")
"""Model names that mean the router's default (MCPFLEET_MODEL in a sandbox is `default`)."""
ROLES = ("system", "user", "assistant")
OLLAMA_VERSION = "0.6.0"
"""The Ollama API revision this endpoint speaks, for `/api/version`."""

STATUS = {"invalid": 400, "unknown_model": 404, "over_quota": 429, "provider": 502, "not_ready": 503}


def status_of(error: ModelError) -> int:
    return STATUS.get(error.reason, 500)


def parse_body(body: str) -> dict[str, Any]:
    try:
        document = json.loads(body or "{}")
    except json.JSONDecodeError as exc:
        raise ModelError("invalid", f"the request body is not JSON: {exc.msg}") from None
    if not isinstance(document, dict):
        raise ModelError("invalid", "the request body must be a JSON object")
    return document


def model_name(body: dict[str, Any]) -> str | None:
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise ModelError("invalid", "`model` must be a string")
    return None if name is None or name in DEFAULT_NAMES else name


def messages(raw: Any) -> list[dict[str, Any]]:
    """Text messages in the router's shape; OpenAI's content parts are joined, images left out."""
    if not isinstance(raw, list) or not raw:
        raise ModelError("invalid", "`messages` must be a non-empty list")
    out = []
    for message in raw:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ModelError("invalid", f"each message needs a role among {', '.join(ROLES)}")
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ModelError("invalid", "a message's content must be text")
        out.append({"role": message["role"], "content": content})
    return out


def _stop(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        return list(raw)
    raise ModelError("invalid", "`stop` must be a string or a list of strings")


def _number(raw: Any, name: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ModelError("invalid", f"`{name}` must be a number")
    return float(raw)


def _limit(raw: Any, name: str) -> int | None:
    value = _number(raw, name)
    return int(value) if value is not None and value > 0 else None  # Ollama: -1 and -2 mean no limit


# -- Ollama ---------------------------------------------------------------------------------------


def ollama_ask(body: dict[str, Any], *, generate: bool = False) -> ChatAsk:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ModelError("invalid", "`options` must be an object")
    if generate:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ModelError("invalid", "`prompt` must be text")
        system = body.get("system")
        chat = ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + [
            {"role": "user", "content": prompt}]
    else:
        chat = messages(body.get("messages"))
    form = body.get("format")
    schema = {"type": "object"} if form == "json" else form if isinstance(form, dict) else None
    return ChatAsk(chat, model=model_name(body), max_tokens=_limit(options.get("num_predict"), "num_predict"),
                   temperature=_number(options.get("temperature"), "temperature"), stop=_stop(options.get("stop")),
                   json_schema=schema)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_piece(model: str, text: str, *, generate: bool) -> dict[str, Any]:
    piece: dict[str, Any] = {"model": model, "created_at": _now(), "done": False}
    if generate:
        piece["response"] = text
    else:
        piece["message"] = {"role": "assistant", "content": text}
    return piece


def ollama_done(answer: ChatAnswer, elapsed_ns: int, *, generate: bool, content: str = "") -> dict[str, Any]:
    """The last object: whole when not streamed (`content`), empty text when it ends a stream."""
    done = ollama_piece(answer.model, content, generate=generate)
    done.update(done=True, done_reason=answer.finish_reason, total_duration=elapsed_ns, load_duration=0,
                prompt_eval_count=answer.tokens_in, prompt_eval_duration=0, eval_count=answer.tokens_out,
                eval_duration=elapsed_ns)
    return done


def ollama_error(error: ModelError) -> dict[str, Any]:
    return {"error": str(error)}


def ollama_embed_input(body: dict[str, Any], *, legacy: bool = False) -> list[str]:
    raw = body.get("prompt") if legacy else body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ModelError("invalid", f"`{'prompt' if legacy else 'input'}` must be text or a non-empty list of texts")
    return texts


def ollama_embed(result: Embeddings, elapsed_ns: int) -> dict[str, Any]:
    return {"model": result.model, "embeddings": result.vectors, "total_duration": elapsed_ns, "load_duration": 0,
            "prompt_eval_count": result.tokens_in}


def ollama_tags(models: list[ModelInfo]) -> dict[str, Any]:
    """The models a provider lists (one not ready yet lists none: the router gives it an empty name)."""
    return {"models": [{"name": m.name, "model": m.name, "modified_at": _now(), "size": 0, "digest": "",
                        "details": {"format": "", "family": m.provider, "families": [m.provider],
                                    "parameter_size": "", "quantization_level": ""}} for m in models if m.name]}


# -- OpenAI ---------------------------------------------------------------------------------------


def openai_ask(body: dict[str, Any]) -> ChatAsk:
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    schema = None
    form = body.get("response_format")
    if isinstance(form, dict) and form.get("type") == "json_object":
        schema = {"type": "object"}
    elif isinstance(form, dict) and form.get("type") == "json_schema":
        schema = (form.get("json_schema") or {}).get("schema") or {"type": "object"}
    return ChatAsk(messages(body.get("messages")), model=model_name(body), max_tokens=_limit(limit, "max_tokens"),
                   temperature=_number(body.get("temperature"), "temperature"), stop=_stop(body.get("stop")),
                   json_schema=schema)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _usage(tokens_in: int, tokens_out: int = 0) -> dict[str, int]:
    return {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}


def openai_completion(answer: ChatAnswer, ident: str) -> dict[str, Any]:
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": answer.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.content},
                         "finish_reason": answer.finish_reason, "logprobs": None}],
            "usage": _usage(answer.tokens_in, answer.tokens_out)}


def openai_chunk(ident: str, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def openai_usage_chunk(ident: str, answer: ChatAnswer) -> dict[str, Any]:
    """Sent last when the ask had `stream_options.include_usage`, as OpenAI does."""
    return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": answer.model,
            "choices": [], "usage": _usage(answer.tokens_in, answer.tokens_out)}


def sse(event: dict[str, Any] | str) -> str:
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


def openai_error(error: ModelError) -> dict[str, Any]:
    return {"error": {"message": str(error), "type": error.reason, "param": None, "code": error.reason}}


def openai_embed_input(body: dict[str, Any]) -> tuple[list[str], bool]:
    """The texts, and whether the vectors go back as base64 (the official client's default)."""
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ModelError("invalid", "`input` must be text or a non-empty list of texts (token arrays are not taken)")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ModelError("invalid", "`encoding_format` must be float or base64")
    return texts, encoding == "base64"


def openai_embeddings(result: Embeddings, as_base64: bool) -> dict[str, Any]:
    def encoded(vector: list[float]) -> list[float] | str:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector

    return {"object": "list", "model": result.model, "usage": _usage(result.tokens_in),
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(result.vectors)]}


def openai_models(models: list[ModelInfo]) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": m.provider}
                                       for m in models if m.name]}
