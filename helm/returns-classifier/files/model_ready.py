"""Readiness check for the serving container: exit 0 only when the model has a READY worker.

TorchServe's /ping can answer "Healthy" before the model's workers have loaded, so readiness
asks the management API, which listens on 127.0.0.1 inside the pod only.

Usage: python3 model_ready.py <management-url> <model-name>
"""

import json
import sys
import urllib.request


def main(argv: list[str]) -> int:
    url, model = argv[1].rstrip("/"), argv[2]
    request = urllib.request.Request(f"{url}/models/{model}")
    try:
        # Token auth on: TorchServe writes its keys to key_file.json in its working directory.
        with open("key_file.json", encoding="utf-8") as fh:
            request.add_header("Authorization", "Bearer " + json.load(fh)["management"]["key"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            described = json.load(response)
    except (OSError, ValueError) as exc:
        print(f"model {model} not described: {exc}", file=sys.stderr)
        return 1
    ready = [w for version in described for w in version.get("workers", []) if w.get("status") == "READY"]
    if not ready:
        print(f"model {model} has no READY worker yet", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
