"""Package a trained model as a TorchServe .mar in the layout KServe's TorchServe runtime mounts:

    <output>/config/config.properties
    <output>/model-store/returns-classifier.mar
    <output>/artifact_manifest.json

    returns-archive --model-dir models/release --output dist/model
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

import handler
import returns_model
from handler.core import CPU_BACKENDS
from handler.serve_config import Listen, ServeConfig, config_properties, model_config_yaml
from returns_model.artifact import load_model, read_int8_graph
from returns_model.export import write_onnx
from returns_model.fileio import write_json, write_text
from returns_model.manifest import content_digest, sha256_file
from returns_model.meta import ModelMeta, read_meta
from returns_model.names import (INT8_FILE, MANIFEST_FILE, MAR_FILE, META_FILE, METRICS_CONFIG_FILE, METRICS_FILE,
                                 MODEL_CONFIG_FILE, MODEL_NAME, MODEL_STORE, ONNX_FILE, TRAIN_CONFIG_FILE,
                                 WEIGHTS_FILE)
from returns_model.results import FLOAT, INT8
from returns_model.rule import choose_rule, rule_meta
from training.lineage import read_lineage

log = logging.getLogger("training.archive")
# The modules the handler imports at serving time: shipped inside the .mar, nothing else.
SHIPPED_PACKAGES = {
    "returns_model": ["__init__.py", "names.py", "fileio.py", "manifest.py", "meta.py", "preprocess.py",
                      "network.py", "artifact.py", "gate.py", "export.py", "results.py", "rule.py"],
    "handler": ["__init__.py", "core.py", "payload.py", "errors.py", "serve_config.py", "onnx_runner.py",
                "openvino_runner.py"],
}
HANDLER_ENTRY = Path(handler.__file__).parent / "torchserve_handler.py"
METRICS_YAML = Path(handler.__file__).parent / "metrics.yaml"


# What a reproducible .mar records instead of the build time (the zip format's earliest date).
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
FIXED_CREATED_ON = "01/01/1980 00:00:00"


def make_reproducible(mar: Path) -> None:
    """Rewrite the .mar so the same model folder always gives the same bytes: members in name
    order, one fixed timestamp and mode, and MAR-INF/MANIFEST.json without the build time.

    torch-model-archiver stamps every member and the manifest with the current time, so a
    SHA-256 pinned in the chart's values would change with every `make archive`.
    """
    with zipfile.ZipFile(mar) as src:
        members = {i.filename: src.read(i) for i in src.infolist() if not i.is_dir()}
    manifest = json.loads(members["MAR-INF/MANIFEST.json"])
    manifest["createdOn"] = FIXED_CREATED_ON
    members["MAR-INF/MANIFEST.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    tmp = mar.with_suffix(".mar.tmp")
    with zipfile.ZipFile(tmp, "w") as dst:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            dst.writestr(info, members[name], compresslevel=6)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(mar)


def mar_file_hashes(mar: Path) -> dict[str, str]:
    with zipfile.ZipFile(mar) as z:
        return {i.filename: hashlib.sha256(z.read(i)).hexdigest() for i in z.infolist() if not i.is_dir()}


def _git_commit() -> str | None:
    try:
        root = Path(returns_model.__file__).resolve().parent.parent
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


def _stage(model_dir: Path, stage: Path, cfg: ServeConfig, meta: ModelMeta, int8_graph: bytes | None) -> Path:
    """Lay out everything the .mar carries besides the handler entry file."""
    payload = stage / "payload"
    for pkg, files in SHIPPED_PACKAGES.items():
        src = Path(sys.modules[pkg].__file__).parent
        (payload / pkg).mkdir(parents=True)
        for name in files:
            shutil.copy2(src / name, payload / pkg / name)
    shutil.copy2(model_dir / META_FILE, payload / META_FILE)
    # The CPU fast path's graph, built here rather than at worker start: the server then needs
    # onnxruntime only (not the exporter's onnx package), and the export's ~2 s stays off start-up.
    model, _ = load_model(model_dir)
    gate_layer = (meta.unfamiliar or {}).get("layer")
    write_onnx(model, gate_layer, meta.preprocess.channels, meta.preprocess.size, payload / ONNX_FILE)
    if int8_graph is not None:  # quantised with its own rule in model.json: shipped as is
        (payload / INT8_FILE).write_bytes(int8_graph)
    shutil.copy2(METRICS_YAML, payload / METRICS_CONFIG_FILE)
    write_text(stage / MODEL_CONFIG_FILE, yaml.safe_dump(model_config_yaml(cfg), sort_keys=False))
    return payload


def build_archive(model_dir: Path, output: Path, cfg: ServeConfig | None = None) -> dict[str, Any]:
    cfg = cfg or ServeConfig()
    model_dir, output = Path(model_dir), Path(output)
    meta = read_meta(model_dir)  # fails early, with a clear message, on a bad model folder
    int8_graph = read_int8_graph(model_dir, meta)  # and on an int8 graph that is not the one its rule was fitted on
    if not (model_dir / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{model_dir / WEIGHTS_FILE}: weights not found; run `make train` first")
    store = output / MODEL_STORE
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        payload = _stage(model_dir, stage, cfg, meta, int8_graph)
        cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", MODEL_NAME,
               "--version", meta.model_version, "--serialized-file", str(model_dir / WEIGHTS_FILE),
               "--handler", str(HANDLER_ENTRY), "--extra-files", str(payload),
               "--config-file", str(stage / MODEL_CONFIG_FILE), "--export-path", str(stage), "--force"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        make_reproducible(stage / MAR_FILE)
        mar = store / MAR_FILE
        shutil.move(str(stage / MAR_FILE), str(mar.with_suffix(".mar.tmp")))
        mar.with_suffix(".mar.tmp").replace(mar)
    files = mar_file_hashes(mar)
    metrics = json.loads((model_dir / METRICS_FILE).read_text()) if (model_dir / METRICS_FILE).exists() else {}
    train_cfg = (json.loads((model_dir / TRAIN_CONFIG_FILE).read_text())
                 if (model_dir / TRAIN_CONFIG_FILE).exists() else {})
    # the rule the archive serves on a CPU that reproduces its probes (returns_model.rule.choose_rule);
    # a GPU, or a CPU where the int8 rule does not hold, serves the float one: every rule's drift
    # reference travels, so a night is judged against the rule that answered it
    rules = [FLOAT] + ([INT8] if int8_graph is not None else [])
    served_rule = choose_rule(meta, "cpu", cfg.cpu_backend, int8_graph is not None)
    served = rule_meta(meta, served_rule)
    manifest = {
        "model_name": MODEL_NAME,
        "model_version": meta.model_version,
        "mar_file": f"{MODEL_STORE}/{MAR_FILE}",
        "mar_sha256": sha256_file(mar),
        "archive_content_sha256": content_digest(files),
        "files": files,
        "data_snapshot_sha256": meta.data.get("snapshot_sha256"),
        "git_commit": _git_commit(),
        "versions": _versions(),
        "serve_config": asdict(cfg),
        "train_config": train_cfg,
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        "served_rule": served_rule,
        "calibration": served.to_dict()["calibration"],
        "reference": served.reference,
        "references": {name: rule_meta(meta, name).reference for name in rules},
        # a retrained or warm-started model's parent (today's key names) and decisions
        **({"lineage": read_lineage(meta.lineage)} if meta.lineage else {}),
    }
    write_text(output / "config" / "config.properties", config_properties(cfg, meta.model_version, Listen()))
    shutil.copy2(METRICS_YAML, output / "config" / METRICS_CONFIG_FILE)
    write_json(output / MANIFEST_FILE, manifest)
    log.info("wrote %s (sha256 %s…) and its manifest", mar, manifest["mar_sha256"][:12])
    return manifest


def main(argv: list[str] | None = None) -> int:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="returns-archive",
                                description="Build the TorchServe archive and its manifest from a trained model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", default="models/release", help="trained model folder (model.pt + model.json)")
    p.add_argument("--output", default="dist/model", help="model root: config/, model-store/, artifact_manifest.json")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="TorchServe server-side batch (requests)")
    p.add_argument("--max-batch-delay-ms", type=int, default=d.max_batch_delay_ms)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--response-timeout-s", type=int, default=d.response_timeout_s)
    p.add_argument("--max-instances", type=int, default=d.max_instances, help="images allowed in one JSON request")
    p.add_argument("--cpu-threads", type=int, default=d.cpu_threads, help="torch threads per worker (0 = auto)")
    p.add_argument("--cpu-backend", choices=CPU_BACKENDS, default=d.cpu_backend,
                   help="the CPU forward pass: ONNX Runtime on the shipped float graph, on the model's int8 graph "
                        "(its own review rule; the float graph where the model has none), or torch eager")
    p.add_argument("--token-auth", action="store_true", help="turn TorchServe's (60-minute) token auth on")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServeConfig(batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms, workers=args.workers,
                      response_timeout_s=args.response_timeout_s, max_instances=args.max_instances,
                      cpu_threads=args.cpu_threads, cpu_backend=args.cpu_backend, token_auth=args.token_auth)
    try:
        manifest = build_archive(Path(args.model_dir), Path(args.output), cfg)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"returns-archive: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}/{manifest['mar_file']}  sha256 {manifest['mar_sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
