"""Serving knobs, and the one writer of TorchServe's two configuration files.

``ServeConfig`` -> ``model-config.yaml`` (inside the .mar: workers, batching, the handler's own
knobs) and ``config.properties`` (the server: addresses, limits, security). The archive builder
and the local server both write through here; the chart's ConfigMap writes the same keys in YAML,
and tests/test_helm_chart.py checks its defaults against ``config_properties``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from typing import Any

from returns_model.names import (MAR_FILE, MAX_IMAGE_PIXELS, MAX_INSTANCES, METRICS_CONFIG_FILE, MODEL_NAME,
                                 MODEL_ROOT_IN_POD, MODEL_STORE)

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Serving knobs: written to the .mar's model-config.yaml and the server's config.properties."""

    # Requests TorchServe groups into one handler call. One request of returns-submit's 256 photos already
    # fills the handler's passes of 32, so merging requests gains little: on a quiet 2-core host (make bench's
    # sweep, 3 runs of 2,000 photos per point) batch 1 beat 4 and 8 at 64 and 128 photos per request in one
    # sweep and was within one point's spread of 4 in others (docs/history/2026-12-04-readme-round-two.md).
    batch_size: int = 1
    max_batch_delay_ms: int = 5  # how long a lone request waits for company (batch sizes above 1)
    # Python workers, each with threads = CPU quota / workers (handler/torchserve_handler.py). On the
    # 2-core bench host, 2 workers of 1 thread served 1,843 photos/s against 1,309 for 1 worker of 2
    # threads (3 interleaved runs of 6,000 photos each, int8 path): one ONNX Runtime thread spends
    # ~10% less CPU per photo than two, and two workers overlap one's decoding with the other's forward pass.
    workers: int = 2
    response_timeout_s: int = 120
    startup_timeout_s: int = 120
    max_instances: int = MAX_INSTANCES  # images per JSON request
    max_image_pixels: int = MAX_IMAGE_PIXELS
    cpu_threads: int = 0  # per worker; 0 = the machine's cores / workers
    # The CPU forward pass (handler/core.py CPU_BACKENDS): "onnx-int8" (the model's int8 graph and its own
    # review rule; the float graph where the model has none), "onnx" (float graph) or "eager".
    cpu_backend: str = "onnx-int8"
    job_queue_size: int = 100  # requests queued per model before a 503; a night keeps a few in flight
    max_request_size: int = 64 * 1024 * 1024
    token_auth: bool = False  # TorchServe tokens expire after 60 min, no renewal: off, with network isolation

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeConfig":
        """From a manifest's ``serve_config``; unknown keys (a newer archive) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def worker_count(value: Any, source: str) -> int | None:
    """A configured worker count (``minWorkers``, or the chart's environment variable); None where it is
    unset or below 1, and where it is not a number, with a warning naming ``source``."""
    try:
        count = int(value) if value is not None else 0
    except (TypeError, ValueError):
        log.warning("%s=%r is not a worker count; ignored", source, value)
        return None
    return count if count >= 1 else None


@dataclass(frozen=True)
class HandlerKnobs:
    """The handler's section of model-config.yaml, as the handler reads it back."""

    max_instances: int = MAX_INSTANCES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    cpu_threads: int = 0
    cpu_backend: str = ServeConfig.cpu_backend
    # The archive's worker count (minWorkers): TorchServe's processes, returns-kserve's default lanes.
    workers: int = ServeConfig.workers

    @classmethod
    def from_model_yaml(cls, model_yaml: dict[str, Any]) -> "HandlerKnobs":
        section = model_yaml.get("handler") or {}
        workers = worker_count(model_yaml.get("minWorkers"), "minWorkers") or ServeConfig.workers
        return cls(max_instances=int(section.get("max_instances") or MAX_INSTANCES),
                   max_image_pixels=int(section.get("max_image_pixels") or MAX_IMAGE_PIXELS),
                   cpu_threads=int(section.get("cpu_threads") or 0),
                   cpu_backend=str(section.get("cpu_backend") or ServeConfig.cpu_backend),
                   workers=workers)


def model_config_yaml(cfg: ServeConfig) -> dict[str, Any]:
    return {
        "minWorkers": cfg.workers,
        "maxWorkers": cfg.workers,
        "batchSize": cfg.batch_size,
        "maxBatchDelay": cfg.max_batch_delay_ms,
        "responseTimeout": cfg.response_timeout_s,
        "startupTimeout": cfg.startup_timeout_s,
        "handler": {"max_instances": cfg.max_instances, "max_image_pixels": cfg.max_image_pixels,
                    "cpu_threads": cfg.cpu_threads, "cpu_backend": cfg.cpu_backend},
    }


@dataclass(frozen=True)
class Listen:
    """Where TorchServe listens and finds its files.

    The defaults suit KServe's TorchServe runtime, which reads config.properties from
    /mnt/models/config: its own server takes 8080 (HTTP) and 8081 (gRPC) and forwards to
    TorchServe on localhost:8085.
    """

    inference: str = "http://127.0.0.1:8085"
    management: str = "http://127.0.0.1:8086"
    metrics: str = "http://0.0.0.0:8082"
    model_root: str = MODEL_ROOT_IN_POD
    grpc_ports: tuple[int, int] | None = None  # (inference, management); None: TorchServe's defaults


def config_properties(cfg: ServeConfig, version: str = "1.0", listen: Listen | None = None,
                      snapshot: bool = True, overrides: dict[str, str] | None = None) -> str:
    """The server config: management on localhost only, no remote model registration.

    ``snapshot`` adds a model_snapshot that loads the model with the configured workers and
    batching at start-up; a caller that registers the model itself leaves it out. ``overrides``
    replace or add keys (tests use it to try other server settings).
    """
    listen = listen or Listen()
    store = f"{listen.model_root}/{MODEL_STORE}"
    lines = {
        "inference_address": listen.inference,
        "management_address": listen.management,
        "metrics_address": listen.metrics,
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "model_store": store,
        "metrics_config": f"{listen.model_root}/config/{METRICS_CONFIG_FILE}",
        "metrics_mode": "prometheus",
        "enable_metrics_api": "true",
        "disable_system_metrics": "true",
        "enable_model_api": "false",
        # Nothing remote: only archives already in the pod's model store. (A pattern that matches
        # bare .mar names makes TorchServe "download" the file onto itself and fail.)
        "allowed_urls": rf"^file://{store}/[A-Za-z0-9._-]+\\.mar$",
        "install_py_dep_per_model": "false",
        "disable_token_authorization": "false" if cfg.token_auth else "true",
        "max_request_size": str(cfg.max_request_size),
        "max_response_size": str(cfg.max_request_size),
        "job_queue_size": str(cfg.job_queue_size),
        "default_workers_per_model": str(cfg.workers),
        "load_models": MAR_FILE,
    }
    if listen.grpc_ports:
        lines["grpc_inference_port"], lines["grpc_management_port"] = map(str, listen.grpc_ports)
    if snapshot:
        model = {"defaultVersion": True, "marName": MAR_FILE, "minWorkers": cfg.workers, "maxWorkers": cfg.workers,
                 "batchSize": cfg.batch_size, "maxBatchDelay": cfg.max_batch_delay_ms,
                 "responseTimeout": cfg.response_timeout_s, "startupTimeout": cfg.startup_timeout_s}
        lines["model_snapshot"] = json.dumps({"name": "startup.cfg", "modelCount": 1,
                                              "models": {MODEL_NAME: {version: model}}}, separators=(",", ":"))
    lines.update(overrides or {})
    return "# Written by handler/serve_config.py; see docs/interfaces.md\n" + "".join(
        f"{k}={v}\n" for k, v in lines.items())
