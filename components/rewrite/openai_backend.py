"""Rewriting through any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp server, OpenAI).

Before the first request the client asks ``base_url``/models once: a server that cannot be reached, a rejected
key or a wrong API root stops the stage at once with one clear error. Requests run with bounded concurrency; a
429, a 5xx, a timeout, a dropped connection or a malformed body is retried with exponential backoff (a
Retry-After header is waited for as asked), within an overall deadline per caption. Any other 4xx (a caption
past the context length, say) fails that caption only: it keeps its original caption and no rewrites, and the
reason (``rejected:http_400``) is counted; a refusal (``content: null``) drops that slot as ``refusal`` and is not
asked again. The faithfulness guard runs on each answer before it is cached: the cache (keyed by model, prompt
and sampling settings, so that a rerun sends no request twice) holds only guarded rewrites and the slots' drop
reasons, and an answer with nothing faithful in it is not cached at all.
"""
from __future__ import annotations

import email.utils
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.hashing import hash_obj
from clipmill.components.common.io import write_json
from clipmill.components.common.log import get_logger

from .generated import Generated
from .guard import GuardRules, guard_rewrites
from .params import OpenAIBackendParams, RewriteParams
from .prompt import build_prompt, clean_completion

log = get_logger("rewrite.openai")

REFUSAL = "refusal"
CONFIG_STATUSES = (401, 403, 404)  # on every request: a wrong key, model or URL, not one bad caption


class RequestFailed(Exception):
    """A request still failed after every retry (``kind``: http_429, http_503, timeout, ...), or was rejected
    with a 4xx other than 429 (``rejected``), which is never retried."""

    def __init__(self, kind: str, detail: str = "", rejected: bool = False):
        super().__init__(kind)
        self.kind, self.detail, self.rejected = kind, detail, rejected

    @property
    def reason(self) -> str:
        return f"{'rejected' if self.rejected else 'backend'}:{self.kind}"


def parse_choices(response: httpx.Response) -> list[str | None] | None:
    """``choices[i].message.content`` of a chat-completions answer (None for a refusal: ``content: null``), or
    None when the body is not that shape."""
    try:
        body = response.json()
    except ValueError:
        return None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    contents: list[str | None] = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), (str, type(None))):
            return None
        if message.get("content") is None and "content" not in message and not message.get("refusal"):
            return None  # no content key at all: a truncated body, not a refusal
        contents.append(message.get("content"))
    return contents


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (a number of seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatCompletionsClient:
    """POSTs chat-completions bodies to ``base_url``/chat/completions with retries; thread-safe."""

    def __init__(self, params: OpenAIBackendParams, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.params, self.sleep, self.clock = params, sleep, clock
        self.root = params.base_url.rstrip("/")
        self.url = self.root + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(params.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=params.concurrency, max_keepalive_connections=params.concurrency)
        timeout = httpx.Timeout(params.timeout_s, connect=min(params.timeout_s, params.connect_timeout_s))
        self.http = httpx.Client(timeout=timeout, headers=headers, limits=limits)
        self.requests_sent = 0
        self._count_lock = threading.Lock()
        self._checked = False
        self._check_lock = threading.Lock()

    def check_server(self) -> None:
        """GET ``base_url``/models once: ``ClipmillError`` when the server cannot be reached, refuses the key or
        is not an OpenAI-compatible API root; a model it does not list is a warning (some servers list none)."""
        with self._check_lock:
            if self._checked:
                return
            where = f"{self.root}/models"
            try:
                response = self.http.get(where)
            except httpx.TransportError as e:
                raise ClipmillError(f"{where}: cannot reach the server ({type(e).__name__}: {e or 'no answer'}); "
                                    "is it running, and is rewrite.openai.base_url right?") from None
            if response.status_code in (401, 403):
                raise ClipmillError(f"{where}: HTTP {response.status_code}: the server refuses the API key (from "
                                    f"${self.params.api_key_env})")
            if response.status_code == 404:
                raise ClipmillError(f"{where}: HTTP 404: not an OpenAI-compatible API root "
                                    "(rewrite.openai.base_url usually ends in /v1)")
            if response.status_code == 200:
                listed = _model_ids(response)
                if listed is not None and self.params.model not in listed:
                    log.warning("%s does not list model %r (it lists %s)", where, self.params.model, listed[:5])
            else:
                log.warning("%s: HTTP %d; going on with the requests", where, response.status_code)
            self._checked = True

    def _send(self, body: dict[str, Any]) -> httpx.Response:
        with self._count_lock:
            self.requests_sent += 1
        return self.http.post(self.url, json=body)

    def complete(self, body: dict[str, Any]) -> list[str | None]:
        """The contents of the answer's choices (None: refused); raises ``RequestFailed`` after the retries, at the
        deadline, or at once on a 4xx other than 429."""
        self.check_server()
        deadline = self.clock() + self.params.deadline_s
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
                    raise RequestFailed(f"http_{response.status_code}", response.text[:300], rejected=True)
            if attempt == self.params.max_retries:
                raise RequestFailed(failure)
            if wait is None:
                wait = min(self.params.backoff_s * 2 ** attempt, self.params.max_backoff_s)
            if self.clock() + wait > deadline:
                raise RequestFailed(failure, f"a wait of {wait:.0f} s would pass deadline_s")
            log.debug("%s (attempt %d); retrying in %.2f s", failure, attempt + 1, wait)
            self.sleep(wait)
            attempt += 1

    def close(self) -> None:
        self.http.close()


def _model_ids(response: httpx.Response) -> list[str] | None:
    try:
        data = response.json().get("data")
        return [m["id"] for m in data if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError, TypeError):
        return None


class AnswerCache:
    """One JSON file per request key under ``root`` (guarded rewrites and drop reasons); an unreadable file is a
    miss."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Generated | None:
        try:
            entry = json.loads(self._path(key).read_text())
            kept, dropped = entry["kept"], entry["dropped"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        texts = isinstance(kept, list) and isinstance(dropped, list) and all(isinstance(t, str) for t in kept + dropped)
        return Generated(kept, dropped=dropped) if texts else None

    def put(self, key: str, generated: Generated, body: dict[str, Any]) -> None:
        write_json({"kept": generated.candidates, "dropped": generated.dropped, "request": body}, self._path(key))


class OpenAIBackend:
    """Batch of captions in; ``rewrites_per_caption`` sampled rewrites per caption out, guarded and cached."""

    def __init__(self, params: RewriteParams, seed: int, sleep: Callable[[float], None] = time.sleep):
        self.params, self.seed = params, seed
        self.client = ChatCompletionsClient(params.openai, sleep)
        self.cache = AnswerCache(params.openai.cache_dir)
        self.guard = GuardRules.from_params(params)
        self.cache_hits = 0
        self.succeeded = False

    def request_body(self, uid: str, caption: str) -> dict[str, Any]:
        p = self.params
        prompt = build_prompt(uid, caption, p.instruction, p.examples, p.examples_per_prompt, self.seed)
        return {"model": p.openai.model, "messages": prompt.messages(), "n": p.rewrites_per_caption,
                "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens}

    def _ask(self, body: dict[str, Any]) -> list[str | None]:
        """``n`` contents; servers that ignore n (llama.cpp) answer one choice per request: ask again for the rest."""
        wanted, contents = body["n"], []
        for _ in range(wanted):
            contents += self.client.complete({**body, "n": wanted - len(contents)})
            if len(contents) >= wanted:
                break
        return contents[:wanted]

    def _rewrite_one(self, uid: str, caption: str, entries: list[str]) -> tuple[Generated, RequestFailed | None]:
        body = self.request_body(uid, caption)
        key = hash_obj(body)
        cached = self.cache.get(key)
        if cached is not None:
            self.cache_hits += 1
            return cached, None
        try:
            contents = self._ask(body)
        except RequestFailed as e:
            return Generated(error=e.reason), e
        answer = Generated([clean_completion(c) for c in contents if c is not None],
                           dropped=[REFUSAL] * sum(c is None for c in contents))
        kept, dropped = guard_rewrites(caption, entries, answer, body["n"], self.guard)
        guarded = Generated(kept, dropped=dropped)
        if kept:  # nothing faithful came back: not cached, a rerun asks again
            self.cache.put(key, guarded, body)
        return guarded, None

    def generate(self, uids: list[str], captions: list[str], entries: list[list[str]]) -> list[Generated]:
        pool = ThreadPoolExecutor(max_workers=self.params.openai.concurrency)
        try:
            answers = list(pool.map(self._rewrite_one, uids, captions, entries))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        results = [generated for generated, _ in answers]
        failures = [failure for _, failure in answers if failure is not None]
        if len(failures) < len(answers):
            self.succeeded = True
        elif failures and not self.succeeded:
            self._stop_if_unusable(failures)
        return results

    def _stop_if_unusable(self, failures: list[RequestFailed]) -> None:
        """Nothing has ever come back: a server that is down, or one that rejects every request for a wrong key,
        model or URL, stops the stage; captions rejected for themselves (a 400) do not."""
        first = failures[0]
        if not any(f.rejected for f in failures):
            raise ClipmillError(f"{self.client.url}: no request succeeded ({first.reason} after "
                                f"{self.params.openai.max_retries} retries); is the server running?")
        statuses = {f.kind for f in failures}
        if len(statuses) == 1 and int(first.kind.removeprefix("http_")) in CONFIG_STATUSES:
            raise ClipmillError(f"{self.client.url}: HTTP {first.kind.removeprefix('http_')} for model "
                                f"{self.params.openai.model!r} on every request: {first.detail}")
