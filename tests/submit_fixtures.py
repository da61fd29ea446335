"""Helpers for the submitter's tests: a small fake inference server speaking the
contract of docs/interfaces.md, real Fashion-MNIST photos as PNG files, and readers of
a run's output."""
from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from returns_model.names import MAX_INSTANCES
from returns_model.results import EAGER, FLOAT, INT8, ONNXRUNTIME

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
REPO = Path(__file__).resolve().parents[1]


# ---- photos -------------------------------------------------------------------------

def _fmnist_images() -> tuple[bytes, int]:
    raw = gzip.decompress((FMNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    _, n, rows, cols = struct.unpack(">IIII", raw[:16])
    return raw[16:], n


_CACHE: dict = {}


def write_photos(folder: Path, n: int, start: int = 0, names=None) -> list[Path]:
    """Write `n` real Fashion-MNIST test images as PNG files under `folder`."""
    from PIL import Image

    if "img" not in _CACHE:
        _CACHE["img"] = _fmnist_images()
    pixels, total = _CACHE["img"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        k = (start + i) % total
        img = Image.frombytes("L", (28, 28), pixels[k * 784:(k + 1) * 784])
        p = folder / (names[i] if names else f"item_{start + i:05d}.png")
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, format="PNG")
        paths.append(p)
    return paths


# ---- a fake inference server ----------------------------------------------------------

class FakeInferenceServer:
    """Answers like the handler: a result per photo (label derived from the bytes' hash),
    `{"error": ...}` for bytes that are not an image. Knobs for faults:
    fail_first (HTTP statuses to answer before the real answers, e.g. [503, 503]),
    delay_s, max_instances, token, poison (bytes that make any batch holding them fail 500),
    fail_after (every request after the first n fails 500: a server gone bad). ``rules``: the rule
    that answers a photo, drawn from its hash (two rules: a night during a rolling update; None: an
    older server, which names neither rule nor runtime)."""

    RUNTIME_OF = {FLOAT: EAGER, INT8: ONNXRUNTIME}

    def __init__(self, model: str = "returns-classifier", *, fail_first=(), delay_s: float = 0.0,
                 max_instances: int = MAX_INSTANCES, token: str | None = None, poison: bytes | None = None,
                 wrong_length: bool = False, fail_after: int | None = None, unfamiliar_share: float = 0.02,
                 rules: tuple[str | None, ...] = (FLOAT,)):
        self.model = model
        self.rules = rules
        self.unfamiliar_share = unfamiliar_share  # share of photos the fake gate flags
        self.fail_first = list(fail_first)
        self.delay_s = delay_s
        self.max_instances = max_instances
        self.token = token
        self.poison = poison
        self.wrong_length = wrong_length
        self.fail_after = fail_after  # requests after this many all fail with 500
        self.requests = 0
        self.photos_seen = 0
        self.sha = "ab" * 32
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeInferenceServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, {"status": "Healthy"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                status, payload = server.answer(self.path, body, self.headers.get("Authorization"))
                self._send(status, payload)

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str, body: bytes, auth: str | None):
        if path not in (f"/predictions/{self.model}", f"/v1/models/{self.model}:predict"):
            return 404, {"code": 404, "type": "ModelNotFoundException", "message": "no such model"}
        if self.token and auth != f"Bearer {self.token}":
            return 401, {"code": 401, "message": "token required"}
        with self.lock:
            self.requests += 1
            if self.fail_first:
                return self.fail_first.pop(0), {"code": 503, "message": "injected failure"}
            if self.fail_after is not None and self.requests > self.fail_after:
                return 500, {"code": 500, "type": "InternalServerException", "message": "Worker died."}
        if self.delay_s:
            time.sleep(self.delay_s)
        try:
            instances = json.loads(body)["instances"]
        except (ValueError, KeyError):
            return 400, {"error": {"code": "bad_json", "message": "not JSON with instances"}}
        if len(instances) > self.max_instances:
            return 400, {"error": {"code": "too_many_instances",
                                   "message": f"{len(instances)} instances in one request; "
                                                      f"the limit is {self.max_instances}"}}
        photos = [base64.b64decode(i["b64"]) for i in instances]
        if self.poison is not None and any(self.poison in p for p in photos):
            return 500, {"code": 500, "type": "InternalServerException", "message": "Worker died."}
        with self.lock:
            self.photos_seen += len(photos)
        preds = [self.predict(p) for p in photos]
        if self.wrong_length:
            preds = preds[:-1]
        status = 400 if preds and all("error" in p for p in preds) else 200
        return status, {"predictions": preds}

    def predict(self, data: bytes) -> dict:
        if not data.startswith(IMAGE_MAGIC):
            return {"error": {"code": "not_an_image", "message": "cannot identify image file"}}
        h = hashlib.sha256(data).digest()
        cid = h[0] % len(CLASSES)
        conf = 0.3 + 0.7 * h[1] / 255
        unfamiliar = int.from_bytes(h[2:4], "big") / 65536 < self.unfamiliar_share
        reasons = [r for r, on in (("low_confidence", conf < 0.6), ("unfamiliar", unfamiliar)) if on]
        rule = self.rules[h[4] % len(self.rules)]
        return {"label": CLASSES[cid], "class_id": cid, "confidence": round(conf, 4),
                "needs_review": bool(reasons), "review_reason": reasons,
                "unfamiliar_score": 2.0 if unfamiliar else 0.1,
                "top_k": [{"label": CLASSES[cid], "class_id": cid, "probability": round(conf, 4)}],
                "model_name": self.model, "model_version": "1.0", "model_sha256": self.sha,
                **({"rule": rule, "runtime": self.RUNTIME_OF[rule]} if rule is not None else {})}


# ---- running the submitter and reading what it wrote ------------------------------------

def submit_args(inbox: Path, out: Path, url: str, *extra: str, connect_deadline: str = "2") -> list[str]:
    """returns-submit's arguments for a test run: short backoffs, log progress."""
    return ["--inbox", str(inbox), "--output", str(out), "--endpoint", url, "--progress", "log",
            "--backoff", "0.01", "--backoff-max", "0.05", "--connect-deadline", connect_deadline, *extra]


def submit_cmd(*args: str) -> list[str]:
    if os.environ.get("RETURNS_MUTMUT_HITS"):  # mutmut's stats run: see tests/mutmut_bridge.py
        return [sys.executable, "-m", "tests.mutmut_bridge", "returns_submit.cli", *args]
    return [sys.executable, "-m", "returns_submit.cli", *args]


def run_submit(*args: str, timeout: float = 120, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(submit_cmd(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kw)


def log_events(stderr: str) -> list[dict]:
    """The submitter's structured log lines (one JSON object per line on stderr)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def recorded_paths(run_dir: Path) -> list[str]:
    """Every path recorded by the run, predictions and rejected together (duplicates kept)."""
    paths = []
    for name in sorted(os.listdir(run_dir)):
        if (name.startswith("predictions") or name.startswith("rejected")) and name.endswith(".jsonl"):
            if name in ("predictions.jsonl", "rejected.jsonl") and any(
                    n.startswith("predictions.shard-") for n in os.listdir(run_dir)):
                continue  # merged copies of the shard files
            paths += [r["path"] for r in read_jsonl(run_dir / name)]
    return paths


def inbox_rel_paths(inbox: Path) -> list[str]:
    return sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file() or p.is_symlink())


def fake_reference(class_names=CLASSES, n: int = 5000, class_distribution=None) -> dict:
    k = len(class_names)
    edges = [i / 10 for i in range(11)]
    return {"reference": {"n": n, "class_names": list(class_names),
                          "class_distribution": class_distribution or [1 / k] * k,
                          "confidence_histogram": {"edges": edges, "counts": [0, 0, 0] + [n // 7] * 7},
                          "unfamiliar_rate": 0.02},
            "archive_content_sha256": "ab" * 32, "mar_sha256": "cd" * 32}


def unlike_reference(n: int = 5000) -> dict:
    """A reference body no night of the fake server resembles: one class in nine of ten photos, four
    confidences in five above 0.9 (the fake's are spread evenly over 0.3 to 1) and a gate that flags
    one photo in a thousand (the fake's flags 2%)."""
    body = fake_reference(n=n, class_distribution=[0.91] + [0.01] * 9)["reference"]
    body["confidence_histogram"]["counts"] = [0] * 7 + [n // 20, 3 * n // 20, 16 * n // 20]
    body["unfamiliar_rate"] = 0.001
    return body


def fake_manifest(served_rule: str, **references: dict) -> dict:
    """An archive manifest with each rule's reference in `references`; its single `reference` is the
    one of the rule it serves on a CPU, as training/archive.py writes it."""
    doc = fake_reference()
    doc.update(served_rule=served_rule, reference=references[served_rule], references=references)
    return doc


# ---- a small volume that can be made full or read-only ------------------------------------

class SmallVolume:
    """A tmpfs of `size` mounted at `path` (needs root; `available` says whether it worked).
    `readonly()` / `writable(size)` remount it."""

    def __init__(self, path: Path, size: str = "1m"):
        self.path = path
        self.size = size
        self.available = False

    def __enter__(self) -> "SmallVolume":
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs",
                                str(self.path)], capture_output=True, timeout=30)
            self.available = r.returncode == 0
        return self

    def remount(self, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(self.path)], check=True, timeout=30)

    def readonly(self) -> None:
        self.remount("ro")

    def writable(self, size: str = "64m") -> None:
        self.remount(f"rw,size={size}")

    def __exit__(self, *exc) -> None:
        if self.available:
            subprocess.run(["umount", "-l", str(self.path)], timeout=30)


# ---- real TorchServe helpers --------------------------------------------------------------

_OWN_SERVER: dict = {}


def disruptable_torchserve(model_root: Path):
    """A LocalTorchServe of our own, for tests that kill workers or stop the server (the
    session's shared one is left alone). Started once per test process and reused; it is
    restarted if a previous test left it down; stopped when the process exits."""
    import atexit

    from scripts.localserve import LocalTorchServe

    ts = _OWN_SERVER.get("ts")
    if ts is None:
        ts = LocalTorchServe(model_root)
        _OWN_SERVER["ts"] = ts
        atexit.register(ts.cleanup)
    if ts.proc is None or ts.proc.poll() is not None or not ts.is_ready():
        ts.stop()
        ts.start(timeout=240)
    return ts


def count_records(run_dir: Path) -> int:
    """Complete lines in a single-shard run's journal (0 before it exists)."""
    count = 0
    for name in ("predictions.jsonl", "rejected.jsonl"):
        try:
            count += (run_dir / name).read_bytes().count(b"\n")
        except FileNotFoundError:
            pass
    return count


def wait_for_records(run_dir: Path, n: int, proc: subprocess.Popen | None = None, timeout: float = 120) -> int:
    """Wait until the run's journal holds at least `n` lines (or the process ended)."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = count_records(run_dir)
        if count >= n or (proc is not None and proc.poll() is not None):
            return count
        time.sleep(0.02)
    raise TimeoutError(f"{run_dir}: {count} records after {timeout} s, wanted {n}")


def assert_exactly_once(run_dir: Path, expected: set[str]) -> list[dict]:
    """Every expected path recorded once across predictions and rejected; returns the records."""
    paths = recorded_paths(run_dir)
    dupes = [p for p, c in Counter(paths).items() if c > 1]
    assert not dupes, f"recorded twice: {dupes[:5]}"
    assert set(paths) == expected, (f"missing {sorted(expected - set(paths))[:5]}, "
                                    f"unexpected {sorted(set(paths) - expected)[:5]}")
    return read_jsonl(run_dir / "predictions.jsonl") + read_jsonl(run_dir / "rejected.jsonl")
