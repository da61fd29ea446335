"""Package a trained model as a TorchServe .mar in the layout KServe's TorchServe runtime mounts:

    <output>/config/config.properties
    <output>/model-store/returns-classifier.mar
    <output>/artifact_manifest.json

    python -m training.archive --model-dir models/release --output dist/model
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

import handler
import training
from scripts.verify_archive import sha256_file
from training.artifact import META_FILE, WEIGHTS_FILE, content_digest, read_meta
from training.io import write_json, write_text

log = logging.getLogger("training.archive")
MODEL_NAME = "returns-classifier"
MODEL_ROOT_IN_POD = "/mnt/models"  # where KServe mounts storageUri (and the chart the model volume)
# The modules the handler imports at serving time: shipped inside the .mar, nothing else.
SHIPPED_MODULES = {
    "training": ["__init__.py", "preprocess.py", "model.py", "artifact.py"],
    "handler": ["__init__.py", "core.py", "payload.py", "errors.py"],
}
HANDLER_ENTRY = Path(handler.__file__).parent / "torchserve_handler.py"
METRICS_YAML = Path(handler.__file__).parent / "metrics.yaml"


@dataclass
class ServeConfig:
    """Serving knobs: written to the .mar's model-config.yaml and the server's config.properties."""

    batch_size: int = 8  # requests TorchServe groups into one handler call
    max_batch_delay_ms: int = 5  # how long a lone request waits for company
    workers: int = 1
    response_timeout_s: int = 120
    startup_timeout_s: int = 120
    max_instances: int = 256  # images per JSON request
    max_image_pixels: int = 40_000_000
    cpu_threads: int = 0  # per worker; 0 = the machine's cores / workers
    job_queue_size: int = 1000
    max_request_size: int = 64 * 1024 * 1024
    token_auth: bool = False  # TorchServe tokens expire after 60 min, no renewal: off, with network isolation


def model_config_yaml(cfg: ServeConfig) -> dict[str, Any]:
    return {
        "minWorkers": cfg.workers,
        "maxWorkers": cfg.workers,
        "batchSize": cfg.batch_size,
        "maxBatchDelay": cfg.max_batch_delay_ms,
        "responseTimeout": cfg.response_timeout_s,
        "startupTimeout": cfg.startup_timeout_s,
        "handler": {"max_instances": cfg.max_instances, "max_image_pixels": cfg.max_image_pixels,
                    "cpu_threads": cfg.cpu_threads},
    }


def config_properties(cfg: ServeConfig, model_name: str = MODEL_NAME, version: str = "1.0") -> str:
    """The server config we ship: management on localhost only, no remote model registration."""
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": {model_name: {version: {
        "defaultVersion": True, "marName": f"{model_name}.mar", "minWorkers": cfg.workers, "maxWorkers": cfg.workers,
        "batchSize": cfg.batch_size, "maxBatchDelay": cfg.max_batch_delay_ms,
        "responseTimeout": cfg.response_timeout_s, "startupTimeout": cfg.startup_timeout_s}}}}
    # Addresses suit KServe's TorchServe runtime, which reads this file from /mnt/models/config:
    # its own server takes 8080 (HTTP) and 8081 (gRPC) and forwards to TorchServe on localhost:8085.
    # The chart's torchserve mode and `make serve` write their own addresses; the rest is shared.
    lines = {
        "inference_address": "http://127.0.0.1:8085",
        "management_address": "http://127.0.0.1:8086",
        "metrics_address": "http://0.0.0.0:8082",
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "model_store": f"{MODEL_ROOT_IN_POD}/model-store",
        "metrics_config": f"{MODEL_ROOT_IN_POD}/config/metrics.yaml",
        "metrics_mode": "prometheus",
        "enable_metrics_api": "true",
        "disable_system_metrics": "true",
        "enable_model_api": "false",
        # Nothing remote: only archives already in the pod's model store. (A pattern that matches
        # bare .mar names makes TorchServe "download" the file onto itself and fail.)
        "allowed_urls": rf"^file://{MODEL_ROOT_IN_POD}/model-store/[A-Za-z0-9._-]+\\.mar$",
        "install_py_dep_per_model": "false",
        "disable_token_authorization": "false" if cfg.token_auth else "true",
        "max_request_size": str(cfg.max_request_size),
        "max_response_size": str(cfg.max_request_size),
        "job_queue_size": str(cfg.job_queue_size),
        "default_workers_per_model": str(cfg.workers),
        "load_models": f"{model_name}.mar",
        "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
    }
    return "# Written by training/archive.py; see docs/interfaces.md\n" + "".join(f"{k}={v}\n" for k, v in lines.items())


def mar_file_hashes(mar: Path) -> dict[str, str]:
    with zipfile.ZipFile(mar) as z:
        return {i.filename: hashlib.sha256(z.read(i)).hexdigest() for i in z.infolist() if not i.is_dir()}


def _git_commit() -> str | None:
    try:
        root = Path(training.__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "torchserve", "torch-model-archiver", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _stage(model_dir: Path, stage: Path, cfg: ServeConfig) -> Path:
    """Lay out everything the .mar carries besides the handler entry file."""
    meta = read_meta(model_dir)
    payload = stage / "payload"
    for pkg, files in SHIPPED_MODULES.items():
        src = Path(sys.modules[pkg].__file__).parent
        (payload / pkg).mkdir(parents=True)
        for name in files:
            shutil.copy2(src / name, payload / pkg / name)
    shutil.copy2(model_dir / META_FILE, payload / META_FILE)
    shutil.copy2(METRICS_YAML, payload / "metrics.yaml")
    write_json(payload / "index_to_name.json", {str(i): n for i, n in enumerate(meta.class_names)})
    write_text(stage / "model-config.yaml", yaml.safe_dump(model_config_yaml(cfg), sort_keys=False))
    return payload


def build_archive(model_dir: Path, output: Path, cfg: ServeConfig | None = None) -> dict[str, Any]:
    cfg = cfg or ServeConfig()
    model_dir, output = Path(model_dir), Path(output)
    meta = read_meta(model_dir)  # fails early, with a clear message, on a bad model folder
    if not (model_dir / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{model_dir / WEIGHTS_FILE}: weights not found; run `make train` first")
    store = output / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        payload = _stage(model_dir, stage, cfg)
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", MODEL_NAME,
               "--version", meta.model_version, "--serialized-file", str(model_dir / WEIGHTS_FILE),
               "--handler", str(HANDLER_ENTRY), "--extra-files", str(payload),
               "--config-file", str(stage / "model-config.yaml"), "--export-path", str(stage), "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        mar = store / f"{MODEL_NAME}.mar"
        shutil.move(str(stage / f"{MODEL_NAME}.mar"), str(mar.with_suffix(".mar.tmp")))
        mar.with_suffix(".mar.tmp").replace(mar)
    files = mar_file_hashes(mar)
    metrics = json.loads((model_dir / "metrics.json").read_text()) if (model_dir / "metrics.json").exists() else {}
    train_cfg = (json.loads((model_dir / "train_config.json").read_text())
                 if (model_dir / "train_config.json").exists() else {})
    manifest = {
        "model_name": MODEL_NAME,
        "model_version": meta.model_version,
        "mar_file": f"model-store/{MODEL_NAME}.mar",
        "mar_sha256": sha256_file(mar),
        "archive_content_sha256": content_digest(files),
        "files": files,
        "data_snapshot_sha256": meta.data.get("snapshot_sha256"),
        "git_commit": _git_commit(),
        "versions": _versions(),
        "serve_config": asdict(cfg),
        "train_config": train_cfg,
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        "calibration": meta.to_dict()["calibration"],
        "reference": meta.reference,
    }
    write_text(output / "config" / "config.properties", config_properties(cfg, MODEL_NAME, meta.model_version))
    shutil.copy2(METRICS_YAML, output / "config" / "metrics.yaml")
    write_json(output / "artifact_manifest.json", manifest)
    log.info("wrote %s (sha256 %s…) and its manifest", mar, manifest["mar_sha256"][:12])
    return manifest


def main(argv: list[str] | None = None) -> int:
    d = ServeConfig()
    p = argparse.ArgumentParser(description="Build the TorchServe archive and its manifest from a trained model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", default="models/release", help="trained model folder (model.pt + model.json)")
    p.add_argument("--output", default="dist/model", help="model root: config/, model-store/, artifact_manifest.json")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="TorchServe server-side batch (requests)")
    p.add_argument("--max-batch-delay-ms", type=int, default=d.max_batch_delay_ms)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--response-timeout-s", type=int, default=d.response_timeout_s)
    p.add_argument("--max-instances", type=int, default=d.max_instances, help="images allowed in one JSON request")
    p.add_argument("--cpu-threads", type=int, default=d.cpu_threads, help="torch threads per worker (0 = auto)")
    p.add_argument("--token-auth", action="store_true", help="turn TorchServe's (60-minute) token auth on")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServeConfig(batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms, workers=args.workers,
                      response_timeout_s=args.response_timeout_s, max_instances=args.max_instances,
                      cpu_threads=args.cpu_threads, token_auth=args.token_auth)
    try:
        manifest = build_archive(Path(args.model_dir), Path(args.output), cfg)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"archive: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}/{manifest['mar_file']}  sha256 {manifest['mar_sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
