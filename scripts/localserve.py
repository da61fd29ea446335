"""Run TorchServe locally on an archive from `make archive`: for `make serve`, the demo, tests and benchmarks.

Each instance gets free loopback ports and its own config, temp and log folders, so several can run
side by side (TorchServe's launcher keeps its PID file in $TMPDIR). Ready means the model has a READY
worker, not merely that /ping answers. Stopping ends the whole process group: no worker is left behind.

    python -m scripts.localserve --model-root dist/model      # foreground, Ctrl-C stops it
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from handler.serve_config import Listen, ServeConfig, config_properties
from returns_model.manifest import ArchiveRefused, verify
from returns_model.names import MANIFEST_FILE, MAR_FILE, MODEL_NAME, MODEL_STORE


# returns-serve's exit codes (docs/exit-codes.md); 0: stopped by SIGTERM/SIGINT.
EXIT_NOT_STARTED = 1  # ServerError (a traceback's code too)
EXIT_BAD_FLAGS = 2  # argparse
EXIT_TORCHSERVE_EXITED = 3  # TorchServe exited by itself after it was ready

EPILOG = f"""\
exit codes:
  0  stopped by SIGTERM/SIGINT (Ctrl-C)
  {EXIT_NOT_STARTED}  TorchServe did not come up: the message says why, its logs are under logs/torchserve/
  {EXIT_BAD_FLAGS}  bad flags
  {EXIT_TORCHSERVE_EXITED}  TorchServe exited by itself after it was ready: its logs are under logs/torchserve/
"""


class ServerError(RuntimeError):
    """TorchServe did not start, or its model never became ready (exit 1)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTorchServe:
    """A TorchServe process on loopback serving ``<model_root>/model-store/<MAR_FILE>``."""

    def __init__(self, model_root: str | Path, workdir: str | Path | None = None, verify_archive: bool = True,
                 **overrides: Any) -> None:
        self.model_root = Path(model_root).resolve()
        self.verify_archive = verify_archive
        self.overrides = {k: str(v) for k, v in overrides.items()}  # extra config.properties keys
        self._own_workdir = workdir is None
        self.workdir = (Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="torchserve-"))).resolve()
        self.proc: subprocess.Popen | None = None
        self.ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc", "grpc_mgmt")}

    # --- addresses ---------------------------------------------------------
    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    # --- lifecycle ---------------------------------------------------------
    def _write_config(self) -> Path:
        """The archive's serving settings (its manifest's serve_config) with loopback addresses.

        No model_snapshot: the model is registered by ``--models``, with the workers and batching
        of the .mar's own model-config.yaml.
        """
        try:
            cfg = ServeConfig.from_dict(json.loads((self.model_root / MANIFEST_FILE).read_text())["serve_config"])
        except (OSError, ValueError, KeyError) as exc:
            raise ServerError(f"{self.model_root / MANIFEST_FILE}: no usable serve_config ({exc!r})") from None
        listen = Listen(inference=self.inference_url, management=self.management_url, metrics=self.metrics_url,
                        model_root=str(self.model_root), grpc_ports=(self.ports["grpc"], self.ports["grpc_mgmt"]))
        text = config_properties(cfg, listen=listen, snapshot=False, overrides=self.overrides)
        path = self.workdir / "config.properties"
        path.write_text(text)
        return path

    def _command(self, config: Path) -> list[str]:
        torchserve = shutil.which("torchserve", path=str(Path(sys.executable).parent)) or shutil.which("torchserve")
        if torchserve is None:
            raise ServerError("the `torchserve` command is not installed; run `make setup`")
        return [torchserve, "--start", "--foreground", "--ncs", "--model-store", str(self.model_root / MODEL_STORE),
                "--ts-config", str(config), "--models", f"{MODEL_NAME}={MAR_FILE}"]

    def start(self, timeout: float = 180.0, wait: bool = True) -> "LocalTorchServe":
        if self.verify_archive:
            try:
                verify(self.model_root)
            except ArchiveRefused as exc:
                raise ServerError(str(exc)) from None
        for sub in ("tmp", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        env = dict(os.environ, TMPDIR=str(self.workdir / "tmp"), TEMP=str(self.workdir / "tmp"),
                   LOG_LOCATION=str(self.log_dir), METRICS_LOCATION=str(self.log_dir), PYTHONDONTWRITEBYTECODE="1")
        with open(self.log_dir / "launcher.log", "ab") as out:
            self.proc = subprocess.Popen(self._command(config), cwd=self.workdir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()  # a failed start leaves no process behind
                raise
        return self

    def model_status(self) -> list[dict[str, Any]] | None:
        """The management API's description of the model, or None while it is not registered."""
        try:
            r = requests.get(f"{self.management_url}/models/{MODEL_NAME}", timeout=5)
        except requests.RequestException:
            return None
        return r.json() if r.status_code == 200 else None

    def is_ready(self) -> bool:
        status = self.model_status()
        return bool(status) and any(w.get("status") == "READY" for m in status for w in m.get("workers", []))

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"TorchServe exited with code {self.proc.returncode}; see {self.log_dir}:\n"
                                  + self.log_tail())
            if self.is_ready():
                return
            ts_log = self.log_dir / "ts_log.log"
            model_log = self.log_dir / "model_log.log"
            if (ts_log.exists() and "Failed to load model" in ts_log.read_text(errors="replace")) or (
                    model_log.exists() and model_log.read_text(errors="replace").count("Backend worker process died") >= 3):
                raise ServerError(f"TorchServe could not load {MODEL_NAME}; see {self.log_dir}:\n" + self.log_tail())
            time.sleep(0.5)
        raise ServerError(f"model {MODEL_NAME} had no READY worker after {timeout:.0f}s; see {self.log_dir}:\n"
                          + self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for name in ("launcher.log", "ts_log.log", "model_log.log"):
            path = self.log_dir / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def worker_pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p.pid for p in procs if any("model_service_worker" in part for part in _cmdline(p))]

    @property
    def frontend_pid(self) -> int | None:
        import psutil

        if self.proc is None:
            return None
        try:
            java = [p for p in psutil.Process(self.proc.pid).children() if "java" in " ".join(_cmdline(p))]
        except psutil.NoSuchProcess:
            return None
        return java[0].pid if java else None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def restart(self, timeout: float = 180.0) -> None:
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalTorchServe":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # A zombie leader still counts; check for live members through /proc.
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="returns-serve",
                                description="Serve the returns classifier locally with TorchServe (foreground).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-root", default="dist/model", help="output of `make archive`")
    p.add_argument("--port", type=int, default=8080, help="inference port on 127.0.0.1")
    args = p.parse_args(argv)
    server = LocalTorchServe(args.model_root, workdir=Path("logs/torchserve"))
    server.ports["inference"] = args.port
    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.start()
    except ServerError as exc:
        print(f"returns-serve: {exc}", file=sys.stderr)
        server.stop()
        return EXIT_NOT_STARTED
    print(json.dumps({"ready": True, "inference": f"{server.inference_url}/predictions/{MODEL_NAME}",
                      "kserve_v1": f"{server.inference_url}/v1/models/{MODEL_NAME}:predict",
                      "metrics": f"{server.metrics_url}/metrics", "logs": str(server.log_dir)}), flush=True)
    try:
        while not stop and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()  # also ends any worker the frontend left behind
    if not stop:  # TorchServe exited without being asked to
        # (Not its exit code: the torchserve launcher returns 0 even when the Java frontend under it was killed.)
        print(f"returns-serve: TorchServe exited by itself after it was ready; its logs are in {server.log_dir}, "
              f"their last lines:\n{server.log_tail()}", file=sys.stderr)
        return EXIT_TORCHSERVE_EXITED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
