"""TorchServe adapter for the returns classifier: a thin layer over ``handler.core``.

TorchServe hands ``handle`` a list with one row per request (server-side batching). The photos of
all requests are classified together (one forward pass on a GPU, passes of 32 on a CPU), and the
results are split back so that exactly one response per request is returned. A bad photo gets its
own error object; a request with no valid photo gets HTTP 400 through TorchServe's per-request
status. Exceptions mean real server faults.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handler.core import BatchStats, Classifier, Work, available_cpus
from handler.errors import RequestError
from handler.payload import ParsedRequest, parse_request
from handler.serve_config import HandlerKnobs, worker_count
from returns_model.preprocess import PhotoError
from returns_model.results import INT8

log = logging.getLogger(__name__)
# TorchServe loads the one class defined in this module, so helpers live in handler.core.
# Custom metrics, declared in metrics.yaml (TorchServe's Prometheus mode exports declared metrics only).
GAUGES = {"ImagesPerBatch": "images", "RejectedImagesPerBatch": "rejected", "LowConfidencePerBatch": "low_confidence",
          "UnfamiliarPerBatch": "unfamiliar", "AverageConfidence": "average_confidence", "DecodeTimeMs": "decode_ms",
          "ForwardTimeMs": "forward_ms"}
COUNTERS = {"ImagesTotal": "images", "RejectedImagesTotal": "rejected", "LowConfidenceTotal": "low_confidence",
            "UnfamiliarTotal": "unfamiliar"}
# Gauges of the worker itself, set with every batch: 1 when the int8 rule answers; 1 when the int8
# rule was asked for and does not serve on this machine (the worker's log says why, once).
RULE_GAUGES = {"Int8RuleServed": lambda core: core.rule.name == INT8,
               "Int8RuleFallback": lambda core: core.fallback is not None}


WORKERS_ENV = "RETURNS_WORKERS_PER_MODEL"


def workers_per_model(model_yaml: dict[str, Any]) -> int:
    """How many workers share the pod's CPUs: the chart's count (``RETURNS_WORKERS_PER_MODEL``, set
    beside its model_snapshot, which overrides the archive's) or else the archive's ``minWorkers``."""
    return (worker_count(os.environ.get(WORKERS_ENV), WORKERS_ENV)
            or worker_count(model_yaml.get("minWorkers"), "minWorkers") or 1)


class ReturnsClassifierHandler(BaseHandler):
    def initialize(self, context) -> None:
        props = context.system_properties
        model_yaml = getattr(context, "model_yaml_config", None) or {}
        knobs = HandlerKnobs.from_model_yaml(model_yaml)
        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            device = torch.device(f"cuda:{gpu_id}")
        else:
            device = torch.device("cpu")
        workers = workers_per_model(model_yaml)
        threads = knobs.cpu_threads or max(1, available_cpus() // workers)
        self.max_instances = knobs.max_instances
        self.core = Classifier(props["model_dir"], device=device, threads=threads,
                               max_image_pixels=knobs.max_image_pixels, cpu_backend=knobs.cpu_backend)
        self.model = self.core.model
        self.device = device
        self.initialized = True
        log.info("returns-classifier ready on %s (%s, %d threads), model %s sha256 %s, the %s rule on %s", device,
                 self.core.backend, threads, self.core.meta.model_version, self.core.model_sha256,
                 self.core.rule.name, self.core.rule.runtime)

    def preprocess(self, data: list[dict[str, Any]]) -> Work:
        """Parse every request and decode all their photos."""
        t0 = time.perf_counter()
        requests: list[ParsedRequest | RequestError] = []
        photos: list[bytes | PhotoError] = []
        for idx, row in enumerate(data):
            try:
                req = parse_request(row, self.max_instances, self._content_type(idx))
                photos.extend(req.photos)
            except RequestError as exc:
                req = exc
            requests.append(req)
        work = Work(requests, self.core.decode(photos))
        work.stats.decode_ms = (time.perf_counter() - t0) * 1000
        return work

    def _content_type(self, idx: int) -> str | None:
        get = getattr(self.context, "get_request_header", None)
        if get is None:
            return None
        return get(idx, "Content-Type") or get(idx, "content-type")

    def inference(self, work: Work, *args: Any, **kwargs: Any) -> Work:
        """One forward pass over every valid photo of the batch."""
        work.results = self.core.classify_decoded(work.decoded, work.stats)
        return work

    def postprocess(self, work: Work) -> list[str]:
        """Split results back per request: exactly one JSON response per request."""
        responses, pos = [], 0
        for idx, req in enumerate(work.requests):
            if isinstance(req, RequestError):
                body: Any = req.to_dict()
                self.context.set_response_status(400, req.code, idx)
            else:
                items = work.results[pos:pos + len(req.photos)]
                pos += len(req.photos)
                body = {"predictions": items} if req.batch else items[0]
                if all("error" in item for item in items):
                    self.context.set_response_status(400, items[0]["error"]["code"], idx)
            self.context.set_response_content_type(idx, "application/json")
            responses.append(json.dumps(body, separators=(",", ":")))
        if pos != len(work.results) or len(responses) != len(work.requests):
            raise RuntimeError(f"batch split mismatch: {len(work.requests)} requests, {len(responses)} responses, "
                               f"{len(work.results)} results, {pos} used")
        self._emit_metrics(work.stats)
        return responses

    def _emit_metrics(self, stats: BatchStats) -> None:
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        dims = [self.context.model_name, "Model"]
        values = [(MetricTypes.GAUGE, name, getattr(stats, attr)) for name, attr in GAUGES.items()]
        values += [(MetricTypes.COUNTER, name, getattr(stats, attr)) for name, attr in COUNTERS.items()]
        values += [(MetricTypes.GAUGE, name, of(self.core)) for name, of in RULE_GAUGES.items()]
        for kind, name, value in values:
            try:
                metrics.get_metric(name, kind).add_or_update(round(float(value), 4), dims)
            except Exception as exc:  # a metrics config without our entries must not fail inference
                log.debug("metric %s not exported: %s", name, exc)
