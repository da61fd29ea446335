"""returns-fetch-model end to end on loopback: a plain HTTP server and moto's S3-compatible server.

A good version tar is fetched, checked against the pinned SHA-256, unpacked atomically and then
passes returns-verify-archive; a tampered tar, a wrong pin or a cut connection leaves nothing at
the version folder. The SigV4 signer is checked against AWS's published GetObject example.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from returns_model import fetch
from returns_model.manifest import verify

MODEL = "returns-classifier"


# --- a small version folder, packed as the chart expects it ---------------------------------


def version_tar(version: str = "1.1.0", *, tamper: bool = False) -> bytes:
    """A tar of a version folder's contents: config/, model-store/<name>.mar, artifact_manifest.json."""
    mar = io.BytesIO()
    with zipfile.ZipFile(mar, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": MODEL, "modelVersion": version}}))
        z.writestr("model.pt", os.urandom(2048))
    mar_bytes = mar.getvalue()
    manifest = {"model_name": MODEL, "model_version": version, "mar_file": f"model-store/{MODEL}.mar",
                "mar_sha256": hashlib.sha256(mar_bytes).hexdigest()}
    if tamper:  # the tar is self-consistent, but not what was pinned: only the pin can tell
        mar_bytes += b"\0"
        manifest["mar_sha256"] = hashlib.sha256(mar_bytes).hexdigest()
    files = {"config/config.properties": b"load_models=returns-classifier.mar\n",
             f"model-store/{MODEL}.mar": mar_bytes,
             "artifact_manifest.json": json.dumps(manifest).encode()}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


GOOD = version_tar()
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
TAMPERED = version_tar(tamper=True)


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- plain HTTP -------------------------------------------------------------------------------


class _Archives(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = {"/good.tar.gz": GOOD, "/tampered.tar.gz": TAMPERED, "/cut.tar.gz": GOOD}.get(self.path)
        if body is None:
            self.send_error(404, "no such archive")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/cut.tar.gz":  # the server goes away mid-body
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Archives)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def run(dest: Path, source: str, sha: str, *extra: str) -> int:
    return fetch.main(["--dest", str(dest), "--source", source, "--sha256", sha, "--retries", "0",
                       "--timeout", "10", *extra])


def test_http_good_archive_is_fetched_and_verified(http_url: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / MODEL / "1.1.0"
    assert run(dest, f"{http_url}/good.tar.gz", GOOD_SHA) == 0
    assert "fetched" in capsys.readouterr().out
    manifest = verify(dest)  # the existing archive check passes on the result
    assert manifest["model_version"] == "1.1.0"
    assert json.loads((dest / fetch.RECORD).read_text())["sha256"] == GOOD_SHA
    assert leftovers(tmp_path / MODEL) == sorted(["1.1.0", *(f"1.1.0/{p}" for p in (
        "config", "config/config.properties", "model-store", f"model-store/{MODEL}.mar",
        "artifact_manifest.json", fetch.RECORD))])
    # A second pod finds the folder and fetches nothing (the server is not even asked).
    assert run(dest, "http://127.0.0.1:9/unreachable.tar.gz", GOOD_SHA) == 0
    assert "present" in capsys.readouterr().out


@pytest.mark.parametrize("path, sha, code, message", [
    ("/tampered.tar.gz", GOOD_SHA, 4, "does not match the pinned"),
    ("/good.tar.gz", hashlib.sha256(b"another archive").hexdigest(), 4, "does not match the pinned"),
    ("/cut.tar.gz", GOOD_SHA, 3, f"connection closed after {len(GOOD) // 2} of {len(GOOD)} bytes"),
    ("/missing.tar.gz", GOOD_SHA, 3, "HTTP 404"),
], ids=["tampered-archive", "wrong-pin", "interrupted", "not-found"])
def test_http_refusals_leave_nothing(http_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     path: str, sha: str, code: int, message: str) -> None:
    dest = tmp_path / MODEL / "1.1.0"
    assert run(dest, http_url + path, sha) == code
    err = capsys.readouterr().err
    assert message in err and f"exit {code}" in err
    assert not dest.exists()
    assert leftovers(tmp_path / MODEL) == []  # no temporary file or folder survives either


def test_a_differently_pinned_existing_version_is_refused(http_url: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "1.1.0"
    assert run(dest, f"{http_url}/good.tar.gz", GOOD_SHA) == 0
    other = hashlib.sha256(TAMPERED).hexdigest()
    assert run(dest, f"{http_url}/tampered.tar.gz", other) == 6
    assert "versions are immutable" in capsys.readouterr().err


def test_empty_folder_is_replaced(http_url: str, tmp_path: Path) -> None:
    """A kubelet creates a missing subPath as an empty folder; the rename replaces it."""
    dest = tmp_path / "1.1.0"
    dest.mkdir()
    assert run(dest, f"{http_url}/good.tar.gz", GOOD_SHA) == 0
    verify(dest)


def test_missing_folder_without_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fetch.main(["--dest", str(tmp_path / "1.0.0")]) == 6
    assert "no source configured" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--source", "https://example.invalid/a.tar"], "needs --sha256"),
    (["--source", "ftp://example.invalid/a.tar", "--sha256", GOOD_SHA], "unsupported source"),
    (["--source", "s3://bucket/a.tar", "--sha256", "abc"], "64 hex digits"),
])
def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              argv: list[str], message: str) -> None:
    assert fetch.main(["--dest", str(tmp_path / "v"), "--retries", "0", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unsafe_archive_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    archive = tmp_path / "evil.tar"
    archive.write_bytes(out.getvalue())
    dest = tmp_path / "models" / "1.0.0"
    assert run(dest, str(archive), hashlib.sha256(out.getvalue()).hexdigest()) == 5
    assert "unsafe member" in capsys.readouterr().err
    assert not (tmp_path / "models" / "escape.txt").exists() and leftovers(tmp_path / "models") == []


def test_file_source_from_a_mounted_claim(tmp_path: Path) -> None:
    archive = tmp_path / "source" / "returns-classifier-1.1.0.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(GOOD)
    dest = tmp_path / "models" / MODEL / "1.1.0"
    assert run(dest, f"file://{archive}", GOOD_SHA) == 0
    verify(dest)


# --- S3 -----------------------------------------------------------------------------------------


def test_sigv4_matches_the_aws_example() -> None:
    """AWS's documented GetObject example (S3 API reference, "Signature Calculations ... Example: GET Object")."""
    headers = fetch.sigv4_headers(
        "GET", "https://examplebucket.s3.amazonaws.com/test.txt", region="us-east-1",
        credentials=fetch.Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        now=dt.datetime(2013, 5, 24, tzinfo=dt.timezone.utc), headers={"Range": "bytes=0-9"})
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


def test_s3_url_styles() -> None:
    assert fetch.s3_object_url("s3://models/a b/v1.tar", endpoint="http://minio:9000/", region="eu-west-1") \
        == "http://minio:9000/models/a%20b/v1.tar"
    assert fetch.s3_object_url("s3://models/v1.tar", endpoint="", region="eu-west-1") \
        == "https://models.s3.eu-west-1.amazonaws.com/v1.tar"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server_mod = pytest.importorskip("moto.server", reason="moto is not installed (requirements-moto.txt)")
    boto3 = pytest.importorskip("boto3")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.port}"  # port 0: read back what was bound
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="returns-classifier/1.1.0.tar.gz", Body=GOOD)
        s3.put_object(Bucket="models", Key="returns-classifier/tampered.tar.gz", Body=TAMPERED)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session")


def test_s3_good_archive(s3_endpoint: str, s3_env: None, tmp_path: Path) -> None:
    dest = tmp_path / MODEL / "1.1.0"
    assert run(dest, "s3://models/returns-classifier/1.1.0.tar.gz", GOOD_SHA, "--s3-endpoint", s3_endpoint) == 0
    assert verify(dest)["model_version"] == "1.1.0"


def test_s3_tampered_and_missing(s3_endpoint: str, s3_env: None, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / MODEL / "1.1.0"
    assert run(dest, "s3://models/returns-classifier/tampered.tar.gz", GOOD_SHA, "--s3-endpoint", s3_endpoint) == 4
    assert run(dest, "s3://models/returns-classifier/9.9.9.tar.gz", GOOD_SHA, "--s3-endpoint", s3_endpoint) == 3
    err = capsys.readouterr().err
    assert "does not match the pinned" in err and "HTTP 404" in err
    assert leftovers(tmp_path / MODEL) == []


def test_s3_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert run(tmp_path / "v", "s3://models/a.tar", GOOD_SHA, "--s3-endpoint", "http://127.0.0.1:9") == 2
    assert "AWS_ACCESS_KEY_ID" in capsys.readouterr().err
