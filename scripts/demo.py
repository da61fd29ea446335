"""`make demo`: the nightly job end to end on this machine.

Starts a local TorchServe on the release archive, fills an inbox with Fashion-MNIST test photos
(PNG files in folders, as a shop's storage would hold them) plus a few broken files, runs
`returns-submit` on it, prints a summary, and stops the server, leaving no process behind.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from scripts.localserve import LocalTorchServe, ServerError
from returns_model.names import MANIFEST_FILE
from training.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, read_idx

BROKEN = {
    "broken/empty.png": b"",
    "broken/not-a-photo.jpg": b"%PDF-1.4 returns label, not a photo",
    "broken/truncated.png": None,  # filled from a real PNG cut in half
}


def build_inbox(inbox: Path, n: int) -> dict[str, str]:
    """n test photos under inbox/<day>/<item>.png; returns relative path -> true label."""
    images, labels = read_idx(DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    true_labels, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    if inbox.exists():
        shutil.rmtree(inbox)
    truth = {}
    for i in range(n):
        rel = f"dock-{i % 3 + 1}/return-{i:05d}.png"
        buf = io.BytesIO()
        Image.fromarray(images[i].numpy()).save(buf, "PNG")
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(buf.getvalue())
        truth[rel] = FASHION_MNIST_CLASSES[int(true_labels[i])]
    for rel, data in BROKEN.items():
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(data if data is not None else (inbox / next(iter(truth))).read_bytes()[:60])
    return truth


def summarise(run_dir: Path, truth: dict[str, str]) -> dict:
    preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    rejected = [json.loads(line) for line in (run_dir / "rejected.jsonl").read_text().splitlines() if line.strip()]
    meta = json.loads((run_dir / "run_metadata.json").read_text())
    known = [p for p in preds if p["path"] in truth]
    correct = sum(p["label"] == truth[p["path"]] for p in known)
    accepted = [p for p in known if not p["needs_review"]]
    return {
        "photos": len(truth) + len(BROKEN),
        "classified": len(preds),
        "rejected": {r["path"]: r["code"] for r in rejected},
        "accuracy": round(correct / max(len(known), 1), 4),
        "review_rate": round(1 - len(accepted) / max(len(known), 1), 4),
        "auto_accepted_accuracy": round(sum(p["label"] == truth[p["path"]] for p in accepted) / max(len(accepted), 1), 4),
        "top_labels": Counter(p["label"] for p in preds).most_common(4),
        "images_per_second": (meta.get("throughput") or {}).get("images_per_second"),
        "model_sha256": (meta.get("model") or {}).get("sha256"),
        "drift": (meta.get("drift") or {}).get("drift"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the nightly job end to end on this machine.")
    p.add_argument("--model-root", default="dist/model", help="output of `make archive`")
    p.add_argument("--workdir", default="build/demo", help="where the inbox and the output volume are made")
    p.add_argument("--n", type=int, default=2000, help="test photos in the demo inbox")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    inbox, output = work / "inbox", work / "output"
    truth = build_inbox(inbox, args.n)
    run_id = "demo-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    print(f"demo: {len(truth)} photos and {len(BROKEN)} broken files in {inbox}; starting TorchServe...", flush=True)
    try:
        with LocalTorchServe(args.model_root, workdir=work / "torchserve") as server:
            cmd = [sys.executable, "-m", "returns_submit.cli", "--inbox", str(inbox), "--output", str(output),
                   "--endpoint", server.inference_url, "--run-id", run_id, "--batch-size", "64", "--concurrency", "4",
                   "--reference", str(Path(args.model_root) / MANIFEST_FILE), "--progress", "log",
                   "--log-level", "WARNING"]
            code = subprocess.run(cmd).returncode
    except ServerError as exc:
        print(f"demo: TorchServe failed: {exc}", file=sys.stderr)
        return 1
    if code not in (0, 3):  # 3 = partial: the broken files are rejected on purpose
        print(f"demo: returns-submit exited with {code}", file=sys.stderr)
        return code
    run_dir = output / f"run_{run_id}"
    s = summarise(run_dir, truth)
    print(f"""
demo summary (server stopped)
  photos in inbox      {s['photos']} ({len(BROKEN)} deliberately broken)
  classified           {s['classified']}
  rejected             {len(s['rejected'])}: {', '.join(f'{k} ({v})' for k, v in s['rejected'].items())}
  accuracy vs labels   {s['accuracy']:.2%}
  sent to review       {s['review_rate']:.1%}  (auto-accepted items {s['auto_accepted_accuracy']:.2%} correct)
  most common labels   {', '.join(f'{k} {v}' for k, v in s['top_labels'])}
  throughput           {s['images_per_second']} photos/s
  model sha256         {s['model_sha256']}
  drift flagged        {s['drift']}
  manifests            {run_dir}/ (predictions.jsonl, predictions.csv, review_queue.jsonl,
                       rejected.jsonl, run_metadata.json, _SUCCESS); latest run named in {output}/LATEST""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
