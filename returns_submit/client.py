"""HTTP client for the inference API: batches of photos in, one answer per photo out.

The retry loop is our own rather than urllib3's `Retry`: an answer is judged by its
body as well as its status (a 400 whose body holds `predictions` is a normal answer,
a 400 with a request-level `error` is not retryable, 404 means the model is being
re-registered and is retried), a 401 re-reads a rotated token, and the attempts are
counted for the run's metadata. The session's adapter therefore has `max_retries=0`.
"""
from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests
from requests.adapters import HTTPAdapter

from returns_submit.errors import ProtocolError, RequestRejected, ServerUnreachable

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({404, 408, 409, 425, 429, 500, 502, 503, 504, 507})


@dataclass
class Answer:
    predictions: list[dict]  # a result or {"error": {...}} per photo, in order
    attempts: int
    latency_s: float  # of the successful request


class BatchFailed(ServerUnreachable):
    """Retries exhausted; `server_error` is True when the server answered 5xx (the batch
    itself may be the cause, so it is worth splitting), False when it was not reachable."""

    def __init__(self, message: str, server_error: bool, attempts: int):
        super().__init__(message)
        self.server_error = server_error
        self.attempts = attempts


class InferenceClient:
    def __init__(self, endpoint: str, model: str, *, api: str = "predictions", timeout: float = 60.0,
                 retries: int = 8, backoff: float = 0.5, backoff_max: float = 30.0,
                 token_file: Path | None = None, pool_size: int = 4,
                 should_stop: Callable[[], bool] = lambda: False, rng: random.Random | None = None):
        base = endpoint.rstrip("/")
        self.api = api
        self.url, self.ping_url = {
            "predictions": (f"{base}/predictions/{model}", f"{base}/ping"),
            "v1": (f"{base}/v1/models/{model}:predict", f"{base}/v1/models/{model}"),
            "v2": (f"{base}/v2/models/{model}/infer", f"{base}/v2/health/live"),
        }[api]
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.token_file = token_file
        self.pool_size = pool_size
        self.should_stop = should_stop
        self._rng = rng or random.Random()
        self._local = threading.local()
        self._token = self._read_token()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_size, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
        return s

    def _read_token(self) -> str | None:
        if self.token_file is None:
            return None
        return Path(self.token_file).read_text().strip() or None

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        return h

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return self._rng.uniform(0, min(self.backoff_max, self.backoff * 2 ** attempt))

    def wait_ready(self, deadline_s: float) -> None:
        """Wait until the server answers at all (any HTTP status), with backoff; a model
        not yet loaded is handled by the predict retries. Raises ServerUnreachable."""
        end = time.monotonic() + deadline_s
        attempt = 0
        while True:
            try:
                self._session().get(self.ping_url, headers=self._headers(), timeout=min(self.timeout, 10.0))
                return
            except requests.RequestException as e:
                last = e
            if self.should_stop() or time.monotonic() >= end:
                raise ServerUnreachable(f"no answer from {self.ping_url} within {deadline_s:g} s: {last}")
            pause = min(self.delay(attempt), max(0.0, end - time.monotonic()))
            log.info("server not reachable yet, retrying in %.1f s: %s", pause, last)
            time.sleep(max(pause, 0.05))
            attempt += 1

    def predict(self, photos: list[bytes]) -> Answer:
        """POST one batch; retry transient failures with backoff. Raises BatchFailed,
        RequestRejected (request-level 400) or ProtocolError (wrong number of answers)."""
        encoded = [base64.b64encode(p).decode("ascii") for p in photos]
        if self.api == "v2":  # one BYTES input of shape [N], base64 text in JSON (docs/interfaces.md)
            body = {"inputs": [{"name": "photos", "shape": [len(photos)], "datatype": "BYTES", "data": encoded}]}
        else:
            body = {"instances": [{"b64": b} for b in encoded]}
        last, server_error = "", False
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.delay(attempt - 1)
                log.info("retrying a batch of %d in %.1f s (attempt %d): %s", len(photos), pause, attempt + 1, last)
                end = time.monotonic() + pause
                while time.monotonic() < end:  # a SIGTERM cuts the wait short
                    if self.should_stop():
                        raise BatchFailed(f"stopped while retrying: {last}", server_error, attempt)
                    time.sleep(min(0.2, max(0.0, end - time.monotonic())))
            t0 = time.monotonic()
            try:
                r = self._session().post(self.url, json=body, headers=self._headers(), timeout=self.timeout)
            except requests.RequestException as e:
                last, server_error = f"{type(e).__name__}: {e}", False
                continue
            latency = time.monotonic() - t0
            if r.status_code == 401 and self.token_file is not None:
                self._token = self._read_token()  # tokens rotate; read the current one
                last, server_error = "401 unauthorized (token re-read)", False
                continue
            if r.status_code in RETRY_STATUS:
                last, server_error = f"HTTP {r.status_code}: {r.text[:200]}", r.status_code >= 500
                continue
            payload = _json_or_none(r)
            if self.api == "v2" and isinstance(payload, dict):
                payload = _v2_as_v1(payload)
            if r.status_code in (200, 400) and isinstance(payload, dict) and "predictions" in payload:
                preds = payload["predictions"]
                if not isinstance(preds, list) or len(preds) != len(photos):
                    n = len(preds) if isinstance(preds, list) else type(preds).__name__
                    raise ProtocolError(f"{self.url} answered {n} predictions for {len(photos)} photos")
                return Answer(preds, attempt + 1, latency)
            if r.status_code == 400 and isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                err = payload["error"]
                raise RequestRejected(str(err.get("code", "bad_request")), str(err.get("message", "")))
            try:
                r.raise_for_status()
            except requests.HTTPError as e:
                hint = " (does the API need --token-file?)" if r.status_code in (401, 403) else ""
                raise ProtocolError(f"{self.url} answered HTTP {r.status_code}{hint}: {r.text[:200]}") from e
            raise ProtocolError(f"{self.url} answered HTTP {r.status_code} without `predictions`: {r.text[:200]}")
        raise BatchFailed(f"{self.url} failed after {self.retries + 1} attempts: {last}", server_error,
                          self.retries + 1)


def _v2_as_v1(payload: dict) -> dict:
    """A v2 answer in the v1 shape the rest of the client reads: the `result` output's JSON objects
    become `predictions`; a 400's `{"error": "<code>: <message>"}` becomes `{"error": {code, message}}`.
    Anything else is returned as is (and reported as a protocol error)."""
    outputs = payload.get("outputs")
    if isinstance(outputs, list):
        result = next((o for o in outputs if isinstance(o, dict) and o.get("name") == "result"), None)
        if result is None or not isinstance(result.get("data"), list):
            return payload
        try:
            return {"predictions": [json.loads(x) for x in result["data"]]}
        except (TypeError, ValueError):
            return payload
    if isinstance(payload.get("result"), list):  # 400: no valid photo; each photo's error
        return {"predictions": payload["result"]}
    if isinstance(payload.get("error"), str):
        code, sep, message = payload["error"].partition(": ")
        if not (sep and code.isidentifier()):
            code, message = "bad_request", payload["error"]
        return {"error": {"code": code, "message": message}}
    return payload


def _json_or_none(r: requests.Response):
    try:
        return r.json()
    except ValueError:
        return None
