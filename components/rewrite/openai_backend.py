"""Rewriting through any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp server, OpenAI).

Requests run with bounded concurrency; a 429, a 5xx, a timeout, a dropped connection or a malformed body is
retried with exponential backoff (a Retry-After header wins); any other HTTP error stops the stage, since
it means a wrong URL, model or key. Answers are cached on disk under a key of model, prompt and sampling
settings, so a rerun sends no request twice.
"""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import httpx

from components.common.errors import ClipmillError
from components.common.hashing import hash_obj
from components.common.io import write_json
from components.common.log import get_logger

from .backends import Generated
from .params import OpenAIBackendParams, RewriteParams
from .prompt import build_prompt, clean_completion

log = get_logger("rewrite.openai")


class RequestFailed(Exception):
    """A request still failed after every retry; ``kind`` says how (http_429, http_503, timeout, ...)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def parse_choices(response: httpx.Response) -> list[str] | None:
    """``choices[i].message.content`` of a chat-completions answer, or None when the body is not that shape."""
    try:
        body = response.json()
    except ValueError:
        return None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    contents = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            return None
        contents.append(content)
    return contents


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class ChatCompletionsClient:
    """POSTs chat-completions bodies to ``base_url``/chat/completions with retries; thread-safe."""

    def __init__(self, params: OpenAIBackendParams, sleep: Callable[[float], None] = time.sleep):
        self.params, self.sleep = params, sleep
        self.url = params.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(params.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=params.concurrency, max_keepalive_connections=params.concurrency)
        self.http = httpx.Client(timeout=params.timeout_s, headers=headers, limits=limits)
        self.requests_sent = 0
        self._count_lock = threading.Lock()

    def _send(self, body: dict[str, Any]) -> httpx.Response:
        with self._count_lock:
            self.requests_sent += 1
        return self.http.post(self.url, json=body)

    def complete(self, body: dict[str, Any]) -> list[str]:
        """The contents of the answer's choices; raises ``RequestFailed`` after the retries, ``ClipmillError`` on 4xx."""
        attempt = 0
        while True:
            wait = None
            try:
                response = self._send(body)
            except httpx.TimeoutException:
                failure = "timeout"
            except httpx.TransportError as e:
                failure = f"connection:{type(e).__name__}"
            else:
                if response.status_code == 200:
                    contents = parse_choices(response)
                    if contents is not None:
                        return contents
                    failure = "malformed_body"
                elif response.status_code == 429 or response.status_code >= 500:
                    failure, wait = f"http_{response.status_code}", retry_after_seconds(response)
                else:
                    raise ClipmillError(f"{self.url}: HTTP {response.status_code} for model "
                                        f"{body.get('model')!r}: {response.text[:300]}")
            if attempt == self.params.max_retries:
                raise RequestFailed(failure)
            if wait is None:
                wait = self.params.backoff_s * 2 ** attempt
            log.debug("%s (attempt %d); retrying in %.2f s", failure, attempt + 1, wait)
            self.sleep(min(wait, self.params.max_backoff_s))
            attempt += 1

    def close(self) -> None:
        self.http.close()


class AnswerCache:
    """One JSON file per request key under ``root``; an unreadable file counts as a miss."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[str] | None:
        try:
            contents = json.loads(self._path(key).read_text())["contents"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return contents if isinstance(contents, list) and all(isinstance(c, str) for c in contents) else None

    def put(self, key: str, contents: list[str], body: dict[str, Any]) -> None:
        write_json({"contents": contents, "request": body}, self._path(key))


class OpenAIBackend:
    """Batch of captions in; ``rewrites_per_caption`` sampled rewrites per caption out (cached)."""

    def __init__(self, params: RewriteParams, seed: int, sleep: Callable[[float], None] = time.sleep):
        self.params, self.seed = params, seed
        self.client = ChatCompletionsClient(params.openai, sleep)
        self.cache = AnswerCache(params.openai.cache_dir)
        self.cache_hits = 0
        self.succeeded = False

    def request_body(self, uid: str, caption: str) -> dict[str, Any]:
        p = self.params
        prompt = build_prompt(uid, caption, p.instruction, p.examples, p.examples_per_prompt, self.seed)
        return {"model": p.openai.model, "messages": prompt.messages(), "n": p.rewrites_per_caption,
                "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens}

    def _rewrite_one(self, uid: str, caption: str) -> Generated:
        body = self.request_body(uid, caption)
        key = hash_obj(body)
        contents = self.cache.get(key)
        if contents is not None:
            self.cache_hits += 1
            return Generated([clean_completion(c) for c in contents])
        wanted = body["n"]
        contents = []
        try:
            # Servers that ignore n (llama.cpp) answer one choice per request: ask again for the rest.
            for _ in range(wanted):
                contents += self.client.complete({**body, "n": wanted - len(contents)})
                if len(contents) >= wanted:
                    break
        except RequestFailed as e:
            return Generated(error=f"backend:{e.kind}")
        contents = contents[:wanted]
        self.cache.put(key, contents, body)
        return Generated([clean_completion(c) for c in contents])

    def generate(self, uids: list[str], captions: list[str], entries: list[list[str]]) -> list[Generated]:
        pool = ThreadPoolExecutor(max_workers=self.params.openai.concurrency)
        try:
            results = list(pool.map(self._rewrite_one, uids, captions))
        finally:
            # On a stopping error, captions not yet sent are not sent at all.
            pool.shutdown(wait=True, cancel_futures=True)
        failures = [r.error for r in results if r.error]
        if any(r.error is None for r in results):
            self.succeeded = True
        elif failures and not self.succeeded:
            # Nothing has ever come back: a wrong base_url or a server that is down, not a flaky request.
            raise ClipmillError(f"{self.client.url}: no request succeeded ({failures[0]} after "
                                f"{self.params.openai.max_retries} retries); is the server running?")
        return results
