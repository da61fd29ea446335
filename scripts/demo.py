"""`make demo`: the nightly job end to end on this machine.

Starts a local TorchServe on the release archive, fills an inbox with Fashion-MNIST test photos
(PNG files in folders, as a shop's storage would hold them), a few photos unlike anything the
model was trained on (kinds never used to tune the gate) and a few broken files, runs
`returns-submit` on it, prints a summary with why photos went to review, and stops the server,
leaving no process behind.
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

from returns_model.names import (LATEST_FILE, MANIFEST_FILE, PREDICTIONS_CSV, PREDICTIONS_FILE, REJECTED_FILE,
                                 REVIEW_QUEUE_FILE, RUN_METADATA_FILE, SUCCESS_MARKER, run_folder)
from returns_submit.errors import EXIT_DRIFT, EXIT_OK, EXIT_PARTIAL
from scripts.localserve import LocalTorchServe, ServerError
from training import unfamiliar
from training.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, read_idx

UNFAMILIAR_KINDS = ("scene_crops", "shapes_text", "pasted_on_background", "patterns", "collage")
UNFAMILIAR = "(unfamiliar)"  # the truth label of a photo that is no product category

BROKEN = {
    "broken/empty.png": b"",
    "broken/not-a-photo.jpg": b"%PDF-1.4 returns label, not a photo",
    "broken/truncated.png": None,  # filled from a real PNG cut in half
}


def build_inbox(inbox: Path, n: int, n_unfamiliar: int) -> dict[str, str]:
    """n test photos under inbox/<day>/<item>.png and n_unfamiliar unfamiliar ones under
    inbox/odd/; returns relative path -> true label."""
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
    per_kind = -(-n_unfamiliar // len(UNFAMILIAR_KINDS)) if n_unfamiliar else 0
    odd = [(kind, photo) for kind in UNFAMILIAR_KINDS
           for photo in unfamiliar.make(kind, per_kind, seed=1, images=images.numpy())] if per_kind else []
    for j, (kind, photo) in enumerate(odd[:n_unfamiliar]):
        rel = f"odd/{kind}-{j:03d}.png"
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(photo)
        truth[rel] = UNFAMILIAR
    for rel, data in BROKEN.items():
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(data if data is not None else (inbox / next(iter(truth))).read_bytes()[:60])
    return truth


def summarise(run_dir: Path, truth: dict[str, str]) -> dict:
    preds = [json.loads(line) for line in (run_dir / PREDICTIONS_FILE).read_text().splitlines() if line.strip()]
    rejected = [json.loads(line) for line in (run_dir / REJECTED_FILE).read_text().splitlines() if line.strip()]
    meta = json.loads((run_dir / RUN_METADATA_FILE).read_text())
    odd = [p for p in preds if truth.get(p["path"]) == UNFAMILIAR]
    known = [p for p in preds if p["path"] in truth and truth[p["path"]] != UNFAMILIAR]
    correct = sum(p["label"] == truth[p["path"]] for p in known)
    accepted = [p for p in known if not p["needs_review"]]
    drift = meta.get("drift") or {}
    return {
        "photos": len(truth) + len(BROKEN),
        "unfamiliar": len(odd),
        "unfamiliar_routed": sum(p["needs_review"] for p in odd),
        "review_reasons": (meta.get("counts") or {}).get("review_reasons", {}),
        "unfamiliar_rate": meta.get("unfamiliar_rate"),
        "reference_unfamiliar_rate": ((drift.get("signals") or {}).get("unfamiliar") or {}).get("reference_rate"),
        "classified": len(preds),
        "rejected": {r["path"]: r["code"] for r in rejected},
        "accuracy": round(correct / max(len(known), 1), 4),
        "review_rate": round(1 - len(accepted) / max(len(known), 1), 4),
        "auto_accepted_accuracy": round(sum(p["label"] == truth[p["path"]] for p in accepted) / max(len(accepted), 1), 4),
        "top_labels": Counter(p["label"] for p in preds).most_common(4),
        "images_per_second": (meta.get("throughput") or {}).get("images_per_second"),
        "model_sha256": (meta.get("model") or {}).get("sha256"),
        "drift": drift.get("drift"),
        "drift_signals": {k: v.get("drift") for k, v in (drift.get("signals") or {}).items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the nightly job end to end on this machine.")
    p.add_argument("--model-root", default="dist/model", help="output of `make archive`")
    p.add_argument("--workdir", default="build/demo", help="where the inbox and the output volume are made")
    p.add_argument("--n", type=int, default=2000, help="test photos in the demo inbox")
    p.add_argument("--unfamiliar", type=int, default=50, help="photos unlike the training data mixed in")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    inbox, output = work / "inbox", work / "output"
    truth = build_inbox(inbox, args.n, args.unfamiliar)
    run_id = "demo-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    print(f"demo: {args.n} test photos, {args.unfamiliar} unfamiliar photos and {len(BROKEN)} broken files in "
          f"{inbox}; starting TorchServe...", flush=True)
    try:
        with LocalTorchServe(args.model_root, workdir=work / "torchserve") as server:
            cmd = [sys.executable, "-m", "returns_submit.cli", "--inbox", str(inbox), "--output", str(output),
                   "--endpoint", server.inference_url, "--run-id", run_id, "--batch-size", "64", "--concurrency", "4",
                   "--reference", str(Path(args.model_root) / MANIFEST_FILE), "--progress", "log",
                   # record: keep each photo's own reason visible even if the night is judged off
                   # (the default, review, would send the whole night to people)
                   "--on-drift", "record", "--log-level", "WARNING"]
            code = subprocess.run(cmd).returncode
    except ServerError as exc:
        print(f"demo: TorchServe failed: {exc}", file=sys.stderr)
        return 1
    # partial: the broken files are rejected on purpose; drift: an off night is still recorded
    if code not in (EXIT_OK, EXIT_PARTIAL, EXIT_DRIFT):
        print(f"demo: returns-submit exited with {code}", file=sys.stderr)
        return code
    run_dir = output / run_folder(run_id)
    s = summarise(run_dir, truth)
    print(f"""
demo summary (server stopped)
  photos in inbox      {s['photos']} ({len(BROKEN)} deliberately broken)
  classified           {s['classified']}
  rejected             {len(s['rejected'])}: {', '.join(f'{k} ({v})' for k, v in s['rejected'].items())}
  accuracy vs labels   {s['accuracy']:.2%}  (Fashion-MNIST photos)
  sent to review       {s['review_rate']:.1%} of Fashion-MNIST photos (auto-accepted items {s['auto_accepted_accuracy']:.2%} correct)
  unfamiliar photos    {s['unfamiliar_routed']} of {s['unfamiliar']} sent to review
  review reasons       {', '.join(f'{k} {v}' for k, v in s['review_reasons'].items())}
  unfamiliar share     {s['unfamiliar_rate']} of the night (reference {s['reference_unfamiliar_rate']})
  most common labels   {', '.join(f'{k} {v}' for k, v in s['top_labels'])}
  throughput           {s['images_per_second']} photos/s
  model sha256         {s['model_sha256']}
  night off (drift)    {s['drift']}  {s['drift_signals']}  (exit code {code}; {EXIT_DRIFT} = off)
  manifests            {run_dir}/ ({PREDICTIONS_FILE}, {PREDICTIONS_CSV}, {REVIEW_QUEUE_FILE},
                       {REJECTED_FILE}, {RUN_METADATA_FILE}, {SUCCESS_MARKER}); latest run named in {output / LATEST_FILE}""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
