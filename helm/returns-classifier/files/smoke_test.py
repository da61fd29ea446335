"""`helm test` check: the model answers a ping and classifies one generated image.

Standard library only, so it runs in the submitter image. Configured by environment:
ENDPOINT (base URL), API ("predictions" for TorchServe, "v1" for KServe), MODEL, TOKEN_FILE (optional).
"""

import base64
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib


def grey_png(width: int = 28, height: int = 28) -> bytes:
    """A small greyscale gradient PNG, built without Pillow."""
    raw = b"".join(b"\x00" + bytes((3 * x + 7 * y) % 256 for x in range(width)) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def call(url: str, body: bytes | None, content_type: str, token: str | None, deadline: float) -> dict:
    """GET (body None) or POST, retrying 5xx and connection errors while the model (re)loads."""
    while True:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
        if token:
            request.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or time.monotonic() > deadline:
                raise SystemExit(f"FAIL {url}: HTTP {exc.code} {exc.read()[:500]!r}")
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"FAIL {url}: {exc}")
        time.sleep(5)


def main() -> int:
    endpoint, api, model = os.environ["ENDPOINT"].rstrip("/"), os.environ["API"], os.environ["MODEL"]
    token = None
    if os.environ.get("TOKEN_FILE"):
        with open(os.environ["TOKEN_FILE"], encoding="utf-8") as fh:
            token = fh.read().strip()
    deadline = time.monotonic() + 180
    image = grey_png()
    if api == "v1":
        status = call(f"{endpoint}/v1/models/{model}", None, "application/json", token, deadline)
        if status.get("ready") is False:
            raise SystemExit(f"FAIL model not ready: {status}")
        body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
        answer = call(f"{endpoint}/v1/models/{model}:predict", body, "application/json", token, deadline)
        result = answer["predictions"][0]
    else:
        status = call(f"{endpoint}/ping", None, "application/json", token, deadline)
        if status.get("status") != "Healthy":
            raise SystemExit(f"FAIL ping: {status}")
        result = call(f"{endpoint}/predictions/{model}", image, "application/octet-stream", token, deadline)
    if "label" not in result or "confidence" not in result:
        raise SystemExit(f"FAIL no classification in {result}")
    print(f"OK {model} answered {result['label']!r} with confidence {result['confidence']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
