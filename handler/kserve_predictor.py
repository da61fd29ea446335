"""KServe predictor for the returns classifier: a ``kserve.Model`` over the same core as the
TorchServe handler (``handler.core.Classifier``), so both answer with the same result objects.

    returns-kserve --model_dir /mnt/models --http_port 8080 --grpc_port 8081

Protocols (docs/interfaces.md has the contract):

- v1 REST ``POST /v1/models/<name>:predict``: the TorchServe handler's rules (handler/payload.py):
  ``{"instances": [...]}`` -> ``{"predictions": [...]}``, or one raw image body -> one result.
- v2 REST ``POST /v2/models/<name>/infer`` and v2 gRPC ``ModelInfer``: one BYTES input of shape [N]
  (base64 text in REST JSON, raw bytes in gRPC) -> outputs ``label``, ``confidence``,
  ``needs_review`` and ``result`` (each photo's v1 result object as JSON, errors included).

A bad photo gets its own error; a request in which no photo is valid, or a malformed request,
gets HTTP 400 / gRPC INVALID_ARGUMENT. The model root is either what ``make archive`` writes
(``artifact_manifest.json`` + ``model-store/*.mar``: the .mar's SHA-256 is verified, then it is
extracted) or an extracted model folder (``model.json`` + ``model.pt``).

One process holds the model and classifies off the event loop, so the loop stays free for health
checks and metrics; scale out with replicas rather than ``--workers``. On the CPU graph paths
(``onnx``, ``onnx-int8``) it runs classifications side by side (``--lanes``; by default as many as
the archive's TorchServe workers, 2, at most one per CPU), the CPUs shared out among them as
TorchServe shares them among its workers. An ONNX Runtime or OpenVINO pass releases the GIL
(OpenVINO: each lane compiles its own model, handler/openvino_runner.py), and on 2 cores two
one-thread passes side by side served 1,930 photos/s against 1,474 for one two-thread pass at a
time (ONNX Runtime, int8 graph). A GPU and the CPU eager path take one request at a time: on an
H200 with 16 cores, 16 lanes that decode side by side and take turns on the GPU served
2,200-3,500 photos/s against 4,300-4,700 with one lane.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kserve
import torch
import yaml
from fastapi.responses import JSONResponse
from kserve import InferOutput, InferRequest, InferResponse, model_server
from kserve import logging as kserve_logging
from kserve.errors import InvalidInput
from prometheus_client import Counter, Gauge, start_http_server

from handler.core import CPU_BACKENDS, BatchStats, Classifier, available_cpus
from handler.errors import RequestError
from handler.payload import instance_photo, parse_request
from handler.serve_config import HandlerKnobs
from returns_model.device import DEVICES, resolve_device
from returns_model.gate import GateError
from returns_model.manifest import ArchiveRefused, verify
from returns_model.meta import ArtifactError
from returns_model.names import META_FILE, MODEL_CONFIG_FILE
from returns_model.preprocess import PhotoError

# A child of KServe's own logger: its handler and format apply, so the start-up line (device, model
# SHA-256) and refusals reach the pod's log like KServe's lines do.
log = logging.getLogger("kserve.returns_classifier")

# returns-kserve's exit codes (docs/exit-codes.md). 0: the server stopped; 1: a traceback (a bug).
EXIT_BAD_FLAGS = 2  # argparse's code too: a flag this server cannot use
EXIT_REFUSED = 3  # the model folder cannot be served as it is (ModelRefused)

EPILOG = f"""\
exit codes:
  0  the server stopped
  1  a traceback: an error it does not expect (a bug)
  {EXIT_BAD_FLAGS}  a flag it cannot use (checked before the model root is read)
  {EXIT_REFUSED}  refused to serve the model root: one line names the folder and what is wrong
"""


class ModelRefused(RuntimeError):
    """The model root cannot be served as it is (exit 3): the archive is missing, differs from its
    manifest or cannot be extracted, or the model folder is: its weights missing or misfitting,
    ``model.json`` or ``model-config.yaml`` malformed, its int8 graph not the one fitted, or a float
    probe that no runtime here reproduces. The message names what is wrong, in one line."""

    exit_code = EXIT_REFUSED


OUTPUTS = [  # v2 outputs, all of shape [N]: one element per photo
    {"name": "label", "datatype": "BYTES", "shape": [-1]},  # "" for a rejected photo
    {"name": "confidence", "datatype": "FP32", "shape": [-1]},  # 0 for a rejected photo
    {"name": "needs_review", "datatype": "BOOL", "shape": [-1]},  # true for a rejected photo
    {"name": "result", "datatype": "BYTES", "shape": [-1]},  # the v1 result object (or error) as JSON
]

IMAGES = Counter("returns_images", "Photos received", ["model_name"])
REJECTED = Counter("returns_rejected_images", "Photos rejected with a per-photo error", ["model_name"])
LOW_CONFIDENCE = Counter("returns_low_confidence", "Photos below the review threshold", ["model_name"])
UNFAMILIAR = Counter("returns_unfamiliar", "Photos the gate found unlike the training data", ["model_name"])
AVERAGE_CONFIDENCE = Gauge("returns_average_confidence", "Mean confidence of the last request's photos",
                           ["model_name"])
# 1 for the rule that answers and the runtime that computes its scores (returns_model/rule.py); int8_fallback
# is 1 where the int8 rule was asked for and does not serve on this machine (the log says why, once).
SERVED_RULE = Gauge("returns_served_rule", "The certified rule this server answers with", ["model_name", "rule",
                                                                                           "runtime", "int8_fallback"])


class Rejected(InvalidInput):
    """The request is malformed or none of its photos is valid: HTTP 400, gRPC INVALID_ARGUMENT.

    ``body`` is the REST answer: the TorchServe handler's, so v1 clients see the same JSON.
    """

    def __init__(self, reason: str, body: dict[str, Any]) -> None:
        super().__init__(reason)
        self.body = body


async def rejected_handler(_request: Any, exc: Rejected) -> JSONResponse:
    return JSONResponse(status_code=400, content=exc.body)


def resolve_model_dir(model_root: Path, scratch: Path) -> Path:
    """An extracted model folder as is; a verified archive root extracted into ``scratch``.

    Raises ModelRefused when the .mar is missing, differs from artifact_manifest.json or cannot be
    read or extracted.
    """
    if (model_root / META_FILE).is_file():
        return model_root
    try:
        mar = model_root / verify(model_root)["mar_file"]
    except ArchiveRefused as exc:
        raise ModelRefused(str(exc)) from exc
    except OSError as exc:  # e.g. PermissionError; its text names the file
        raise ModelRefused(f"cannot read the archive or its manifest: {exc}") from exc
    try:
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(scratch)  # zipfile drops absolute paths and ".." from member names
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelRefused(f"{mar}: cannot be extracted ({type(exc).__name__}: {exc})") from exc
    return scratch


def read_knobs(model_dir: Path) -> HandlerKnobs:
    """The handler's knobs from the .mar's model-config.yaml (the defaults for a plain model folder);
    ModelRefused, naming the file, where it is unreadable or holds a value the handler cannot use."""
    path = model_dir / MODEL_CONFIG_FILE
    try:
        knobs = HandlerKnobs.from_model_yaml(yaml.safe_load(path.read_text()) or {} if path.is_file() else {})
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:  # AttributeError: not a mapping
        raise ModelRefused(f"{path}: not a model-config.yaml the handler can use ({type(exc).__name__}: {exc})") \
            from exc
    if knobs.cpu_backend not in CPU_BACKENDS:
        raise ModelRefused(f"{path}: handler.cpu_backend must be one of {', '.join(CPU_BACKENDS)}, "
                           f"not {knobs.cpu_backend!r}")
    return knobs


def check_lanes(lanes: int) -> None:
    if lanes < 0:
        raise ValueError(f"--lanes must be 0 (the archive's worker count) or more, not {lanes}")


class ReturnsClassifierModel(kserve.Model):
    def __init__(self, name: str | None, model_dir: Path, device: str = "auto", lanes: int = 0) -> None:
        check_lanes(lanes)
        knobs = read_knobs(model_dir)
        self.max_instances = knobs.max_instances
        dev, cpus = resolve_device(device), available_cpus()
        graph_path = dev.type == "cpu" and knobs.cpu_backend != "eager"
        self.lanes = (lanes or min(knobs.workers, cpus)) if graph_path else 1
        threads = knobs.cpu_threads or max(1, cpus // self.lanes)  # cpu_threads: per lane, as per worker
        try:
            self.core = Classifier(model_dir, device=dev, threads=threads,
                                   max_image_pixels=knobs.max_image_pixels, cpu_backend=knobs.cpu_backend)
        except (ArtifactError, GateError, OSError) as exc:  # the folder's content, not a setting of this server
            raise ModelRefused(str(exc)) from exc
        if dev.type == "cpu" and self.core.backend == "eager" and self.lanes > 1:  # no onnxruntime: fell back
            self.lanes, threads = 1, knobs.cpu_threads or cpus
            torch.set_num_threads(threads)
        super().__init__(name or self.core.meta.model_name)
        self._pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="classify")
        self.ready = True
        lanes_text = f"{self.lanes} lanes" + (f" of {threads} threads" if dev.type == "cpu" else "")
        log.info("%s ready on %s (%s, %s), model %s sha256 %s, the %s rule on %s", self.name, self.core.device,
                 self.core.backend, lanes_text, self.core.meta.model_version, self.core.model_sha256,
                 self.core.rule.name, self.core.rule.runtime)
        SERVED_RULE.labels(self.name, self.core.rule.name, self.core.rule.runtime,
                           str(int(self.core.fallback is not None))).set(1)

    def get_input_types(self) -> list[dict[str, Any]]:
        return [{"name": "photos", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [dict(o) for o in OUTPUTS]

    async def predict(self, payload: dict | bytes | InferRequest,
                      headers: dict[str, str] | None = None) -> dict | InferResponse:
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload)
        return await self._predict_v1(payload, (headers or {}).get("content-type"))

    # --- v1 ------------------------------------------------------------------
    async def _predict_v1(self, body: dict | bytes, content_type: str | None) -> dict[str, Any]:
        try:
            req = parse_request({"body": body}, self.max_instances, content_type)
        except RequestError as exc:
            raise Rejected(f"{exc.code}: {exc.message}", exc.to_dict()) from None
        results = await self._classify(req.photos)
        answer = {"predictions": results} if req.batch else results[0]
        if all("error" in r for r in results):
            raise Rejected(_no_valid_photo(results), answer)
        return answer

    # --- v2 ------------------------------------------------------------------
    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        photos = self._v2_photos(request)
        results = await self._classify(photos)
        if all("error" in r for r in results):
            raise Rejected(_no_valid_photo(results), {"error": _no_valid_photo(results), "result": results})
        ok = [r if "error" not in r else None for r in results]
        outputs = [
            InferOutput("label", [len(results)], "BYTES", [r["label"] if r else "" for r in ok]),
            InferOutput("confidence", [len(results)], "FP32", [r["confidence"] if r else 0.0 for r in ok]),
            InferOutput("needs_review", [len(results)], "BOOL", [r["needs_review"] if r else True for r in ok]),
            InferOutput("result", [len(results)], "BYTES", [json.dumps(r, separators=(",", ":")) for r in results]),
        ]
        return InferResponse(request.id or str(uuid.uuid4()), self.name, outputs,
                             model_version=self.core.meta.model_version,
                             use_binary_outputs=request.use_binary_outputs,
                             requested_outputs=request.request_outputs)

    def _v2_photos(self, request: InferRequest) -> list[bytes | PhotoError]:
        """The one BYTES input of shape [N] -> N photos (raw bytes from gRPC, base64 text from REST)."""
        if len(request.inputs) != 1:
            raise Rejected(f"bad_request: expected exactly one input (BYTES, shape [N]), got {len(request.inputs)}",
                           {"error": "expected exactly one input of datatype BYTES and shape [N]"})
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
            reason = (f"bad_request: input {tensor.name!r} must be BYTES of shape [N] "
                      f"(one encoded photo per element), got {tensor.datatype} {tensor.shape}")
            raise Rejected(reason, {"error": reason})
        n = tensor.shape[0]
        if n < 1:
            reason = f"bad_request: input {tensor.name!r} has shape [{n}]; a request carries at least one photo"
            raise Rejected(reason, {"error": reason})
        if n > self.max_instances:  # the wording of the v1 path (handler/payload.py), which clients read
            reason = f"too_many_instances: {n} photos in one request; the limit is {self.max_instances}"
            raise Rejected(reason, {"error": reason})
        try:
            items = list(tensor.as_numpy()) if tensor._raw_data is not None else list(tensor.data or [])
        except Exception as exc:  # a binary tensor whose length prefixes do not add up
            raise Rejected(f"bad_request: unreadable BYTES tensor: {exc}", {"error": str(exc)}) from None
        if len(items) != n:
            reason = f"bad_request: input {tensor.name!r} has shape [{n}] but {len(items)} elements"
            raise Rejected(reason, {"error": reason})
        return [bytes(x) if isinstance(x, (bytes, bytearray)) else instance_photo(x, i) for i, x in enumerate(items)]

    # --- the core, on its own thread -------------------------------------------
    async def _classify(self, photos: list[bytes | PhotoError]) -> list[dict[str, Any]]:
        stats = BatchStats()
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._pool, self.core.classify, photos, stats)
        if len(results) != len(photos):
            raise RuntimeError(f"{len(photos)} photos in, {len(results)} results out")
        IMAGES.labels(self.name).inc(stats.images)
        REJECTED.labels(self.name).inc(stats.rejected)
        LOW_CONFIDENCE.labels(self.name).inc(stats.low_confidence)
        UNFAMILIAR.labels(self.name).inc(stats.unfamiliar)
        if stats.images > stats.rejected:
            AVERAGE_CONFIDENCE.labels(self.name).set(stats.average_confidence)
        return results


def _no_valid_photo(results: list[dict[str, Any]]) -> str:
    codes = sorted({r["error"]["code"] for r in results})
    return f"no valid photo in the request ({len(results)} rejected: {', '.join(codes)}); " \
           f"first: {results[0]['error']['message']}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="returns-kserve", parents=[model_server.parser],
                                description="Serve the returns classifier with KServe's ModelServer "
                                            "(v1 and v2 REST, v2 gRPC, /metrics).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default="/mnt/models", type=Path,
                   help="model root: artifact_manifest.json + model-store/*.mar (verified, then extracted), "
                        "or an extracted model folder with model.json and model.pt")
    p.add_argument("--metrics_port", default=0, type=int,
                   help="also serve /metrics (KServe's request metrics and ours) on this port, so that a "
                        "NetworkPolicy can admit Prometheus there without admitting it to inference; "
                        "0 = only on --http_port")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where the network runs: auto = the first GPU when CUDA sees one (fp16 autocast), else the CPU")
    p.add_argument("--lanes", default=0, type=int,
                   help="classifications run side by side on the CPU graph paths, CPUs shared out among them "
                        "(0 = the archive's worker count, at most one per CPU); a GPU and the CPU eager path use 1")
    p.set_defaults(model_name=None)  # None: the artifact's own model_name (returns-classifier)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.configure_logging:  # before the model loads (ModelServer would configure it only afterwards)
        kserve_logging.configure_logging(args.log_config_file)
    # The flags first, so that a refusal below is always the model folder's.
    if args.workers != 1:
        log.error("returns-kserve: --workers must be 1: one process holds the model; run more replicas instead")
        return EXIT_BAD_FLAGS
    try:
        check_lanes(args.lanes)
        resolve_device(args.device)
    except ValueError as exc:  # returns_model.device.DeviceError among them: a GPU this machine does not have
        log.error("returns-kserve: %s", exc)
        return EXIT_BAD_FLAGS
    with tempfile.TemporaryDirectory(prefix="returns-kserve-") as scratch:
        model_dir = None
        try:
            model_dir = resolve_model_dir(args.model_dir, Path(scratch))
            model = ReturnsClassifierModel(args.model_name, model_dir, args.device, args.lanes)
        except ModelRefused as exc:
            where = f" (its .mar extracted to {model_dir})" if model_dir not in (None, args.model_dir) else ""
            log.error("returns-kserve: refusing to serve %s%s: %s", args.model_dir, where, " ".join(str(exc).split()))
            return exc.exit_code
        model_server.app.add_exception_handler(Rejected, rejected_handler)
        if args.metrics_port:  # the same registry as the HTTP port's /metrics, on a daemon thread
            start_http_server(args.metrics_port)
        server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                                    max_threads=args.max_threads, max_asyncio_workers=args.max_asyncio_workers,
                                    enable_grpc=args.enable_grpc, enable_docs_url=args.enable_docs_url,
                                    enable_latency_logging=args.enable_latency_logging,
                                    access_log_format=args.access_log_format, event_loop=args.event_loop,
                                    timeout_keep_alive=args.timeout_keep_alive)
        server.start([model])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
