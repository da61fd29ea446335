"""Check a model root before serving: the .mar's SHA-256 must match artifact_manifest.json.

    python -m scripts.verify_archive /mnt/models      # exit 0 = verified, 1 = refused

Standard library only: it runs in the submitter image as an init container, and locally
before `make serve`, so a tampered or half-copied archive is never served.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


class ArchiveRefused(RuntimeError):
    """The archive is missing, or differs from what its manifest records."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(model_root: Path) -> dict:
    """Return the manifest when the archive matches it; raise ArchiveRefused otherwise."""
    manifest_path = model_root / "artifact_manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        mar = model_root / manifest["mar_file"]
        expected = manifest["mar_sha256"]
    except FileNotFoundError:
        raise ArchiveRefused(f"{manifest_path}: not found; build it with `make archive`") from None
    except (KeyError, ValueError) as exc:
        raise ArchiveRefused(f"{manifest_path}: unreadable manifest ({exc!r})") from None
    if not mar.resolve().is_relative_to(model_root.resolve()):
        raise ArchiveRefused(f"{manifest_path}: mar_file {manifest['mar_file']!r} points outside {model_root}")
    if not mar.is_file():
        raise ArchiveRefused(f"{mar}: archive named by the manifest is missing")
    actual = sha256_file(mar)
    if actual != expected:
        raise ArchiveRefused(f"{mar}: SHA-256 {actual} does not match artifact_manifest.json ({expected}); "
                             "the archive was changed or copied incompletely: refusing to serve it")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Verify a model root's .mar against its artifact_manifest.json.")
    p.add_argument("model_root", type=Path, help="folder with artifact_manifest.json and model-store/")
    args = p.parse_args(argv)
    try:
        manifest = verify(args.model_root)
    except ArchiveRefused as exc:
        print(f"verify_archive: REFUSED: {exc}", file=sys.stderr)
        return 1
    print(f"verify_archive: ok {manifest['mar_file']} sha256 {manifest['mar_sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
