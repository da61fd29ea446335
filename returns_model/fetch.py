"""Fetch one model version into its immutable folder, verified against a pinned SHA-256.

    returns-fetch-model --dest /models/returns-classifier/1.1.0 \\
        --source s3://models/returns-classifier-1.1.0.tar --sha256 <64 hex digits>

A model version is the folder ``<model-root>/<name>/<version>/`` (``config/``,
``model-store/<name>.mar``, ``artifact_manifest.json``). It travels as one uncompressed or
gzipped tar of that folder's contents, so the pinned SHA-256 covers everything that is served:
the archive, the server config KServe reads and the manifest the submitter compares against.

Order of durability: the tar is streamed into a temporary file beside the destination while it is
hashed, fsynced, and compared with the pinned digest (never with one downloaded from the same
place); only then is it unpacked into a temporary folder, fsynced and renamed onto the version
folder in one step. An interrupted or tampered download therefore never appears at the final path.
When the version folder is already there (an earlier pod, the training Job, a hand copy) nothing
is fetched; a ``fetch_record.json`` left by an earlier fetch must name the same digest.

Sources: ``http(s)://`` (urllib, timeouts), ``s3://bucket/key`` (AWS SigV4, credentials from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, any S3-compatible endpoint), and a
local path or ``file://`` URL (a mounted claim). Standard library only: it runs in the submitter's
torch-free image as an init container.

Exit codes: 0 present or fetched, 2 bad arguments, 3 download failed, 4 SHA-256 mismatch,
5 not a usable archive, 6 version folder missing with no source or holding another archive,
7 destination not writable.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

from returns_model.fileio import fsync_dir, write_json
from returns_model.names import MANIFEST_FILE as MANIFEST

RECORD = "fetch_record.json"  # written by this tool into the version folder: source and digest
CHUNK = 1 << 20
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class FetchError(Exception):
    """Base class: the version could not be made available; ``exit_code`` says why."""

    exit_code = 1


class BadArguments(FetchError):
    """A flag or credential is missing or malformed (exit 2)."""

    exit_code = 2


class DownloadFailed(FetchError):
    """The source did not deliver the whole archive: network, HTTP status, cut connection (exit 3)."""

    exit_code = 3


class ChecksumMismatch(FetchError):
    """The downloaded archive's SHA-256 differs from the pinned value (exit 4)."""

    exit_code = 4


class BadArchive(FetchError):
    """The archive is not a tar of a version folder, or has unsafe members (exit 5)."""

    exit_code = 5


class NotAvailable(FetchError):
    """The version folder is missing and there is no source, or it holds another archive (exit 6)."""

    exit_code = 6


class DestinationError(FetchError):
    """The destination cannot be written (read-only, full, wrong owner) (exit 7)."""

    exit_code = 7


# --- S3 request signing (AWS Signature Version 4) ----------------------------------------------


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Credentials":
        access, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
        if not access or not secret:
            raise BadArguments("s3:// source needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment "
                               "(the chart takes them from model.source.s3.existingSecret)")
        return cls(access, secret, env.get("AWS_SESSION_TOKEN", ""))


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def sigv4_headers(method: str, url: str, *, region: str, credentials: Credentials, now: dt.datetime,
                  headers: Mapping[str, str] | None = None, payload_sha256: str = EMPTY_SHA256,
                  service: str = "s3") -> dict[str, str]:
    """Headers that sign a request without a query string (Authorization, x-amz-date, ...).

    The path of ``url`` must already be URI-encoded as S3 expects (each segment once).
    """
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    signed = {k.lower(): " ".join(str(v).split()) for k, v in (headers or {}).items()}
    signed.update({"host": parts.netloc, "x-amz-content-sha256": payload_sha256, "x-amz-date": amz_date})
    if credentials.session_token:
        signed["x-amz-security-token"] = credentials.session_token
    names = sorted(signed)
    canonical = "\n".join([method, parts.path or "/", "", *(f"{n}:{signed[n]}" for n in names), "",
                           ";".join(names), payload_sha256])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + credentials.secret_key).encode(), amz_date[:8]), region), service),
                "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {k: v for k, v in signed.items() if k != "host"}
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
                            f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return out


def s3_object_url(source: str, *, endpoint: str, region: str) -> str:
    """https URL of s3://bucket/key: path style on a custom endpoint, virtual-hosted on AWS."""
    parts = urllib.parse.urlsplit(source)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise BadArguments(f"{source!r}: expected s3://<bucket>/<key>")
    quoted = urllib.parse.quote(key, safe="/~")
    if endpoint:
        return f"{endpoint.rstrip('/')}/{bucket}/{quoted}"
    return f"https://{bucket}.s3.{region}.amazonaws.com/{quoted}"


# --- download -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 60.0
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    retries: int = 2


def _open(source: str, opts: FetchOptions) -> tuple[BinaryIO, int | None]:
    """An open stream of the source and its announced length (None = unknown)."""
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme in ("", "file"):
        path = Path(urllib.parse.urlsplit(source).path if scheme else source)
        try:
            stream = open(path, "rb")
        except OSError as exc:
            raise DownloadFailed(f"{path}: cannot read the archive ({exc.strerror})") from None
        return stream, path.stat().st_size
    if scheme in ("http", "https"):
        url, headers = source, {}
    elif scheme == "s3":
        url = s3_object_url(source, endpoint=opts.s3_endpoint, region=opts.s3_region)
        headers = sigv4_headers("GET", url, region=opts.s3_region, credentials=Credentials.from_env(),
                                now=dt.datetime.now(dt.timezone.utc))
    else:
        raise BadArguments(f"{source!r}: unsupported source; use http(s)://, s3://<bucket>/<key> or a path")
    request = urllib.request.Request(url, headers={**headers, "User-Agent": "returns-fetch-model"})
    try:
        response = urllib.request.urlopen(request, timeout=opts.timeout)
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace").strip()
        raise DownloadFailed(f"{url}: HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")) from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadFailed(f"{url}: {getattr(exc, 'reason', exc)}") from None
    length = response.headers.get("Content-Length")
    return response, int(length) if length and length.isdigit() else None


def download(source: str, target: BinaryIO, opts: FetchOptions) -> str:
    """Stream the source into ``target`` (fsynced) and return its SHA-256.

    Raises DownloadFailed when fewer bytes arrive than announced (a cut connection).
    """
    digest, received = hashlib.sha256(), 0
    stream, expected = _open(source, opts)
    try:
        with stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                target.write(chunk)
                received += len(chunk)
    except (OSError, EOFError) as exc:  # http.client.IncompleteRead is an HTTPException, not OSError
        raise DownloadFailed(f"{source}: transfer broke off after {received} bytes ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - http.client raises its own hierarchy mid-body
        raise DownloadFailed(f"{source}: transfer broke off after {received} bytes ({exc!r})") from None
    if expected is not None and received != expected:
        raise DownloadFailed(f"{source}: connection closed after {received} of {expected} bytes")
    target.flush()
    os.fsync(target.fileno())
    return digest.hexdigest()


# --- unpacking ----------------------------------------------------------------------------------


def _safe_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Regular files and folders with plain relative names only: no links, devices or '..'."""
    members = archive.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise BadArchive(f"unsafe member {m.name!r} in the archive (only relative files and folders)")
    return members


def unpack(tar_path: Path, into: Path) -> None:
    """Unpack the verified tar into ``into`` (fsynced) and check it looks like a version folder."""
    try:
        with tarfile.open(tar_path, "r:*") as archive:
            members = _safe_members(archive)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(into, members=members, **kwargs)
    except tarfile.TarError as exc:
        raise BadArchive(f"not a tar archive of a version folder ({exc})") from None
    if not (into / MANIFEST).is_file():
        names = sorted(p.name for p in into.iterdir())
        raise BadArchive(f"the archive has no top-level {MANIFEST} (found {names}); pack the version folder's "
                         "contents: tar -C <version folder> -cf <name>-<version>.tar .")
    for path in sorted(into.rglob("*"), reverse=True):
        fsync_dir(path)
    fsync_dir(into)


# --- the version folder -------------------------------------------------------------------------


def present(dest: Path, sha256: str | None) -> bool:
    """True when the version folder is complete; raise NotAvailable when it holds another archive."""
    if not (dest / MANIFEST).is_file():
        if dest.is_dir() and any(dest.iterdir()):
            raise NotAvailable(f"{dest} exists without {MANIFEST}: a half-finished copy? Remove it so the "
                               "version can be fetched again")
        return False
    record_path = dest / RECORD
    if sha256 and record_path.is_file():
        recorded = json.loads(record_path.read_text(encoding="utf-8")).get("sha256")
        if recorded != sha256:
            raise NotAvailable(f"{dest} was fetched from an archive with SHA-256 {recorded}, but {sha256} is pinned: "
                               "versions are immutable, give the new archive a new model.version")
    return True


def fetch(dest: Path, source: str, sha256: str, opts: FetchOptions = FetchOptions()) -> str:
    """Make ``dest`` hold the verified version; returns what was done ("present" or "fetched")."""
    if present(dest, sha256):
        return "present"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    except OSError as exc:
        raise DestinationError(f"{dest.parent}: cannot write ({exc.strerror})") from None
    try:
        tar_path = work / "archive.tar"
        for attempt in range(opts.retries + 1):
            try:
                with open(tar_path, "wb") as fh:
                    actual = download(source, fh, opts)
                break
            except DownloadFailed as exc:
                if attempt == opts.retries:
                    raise
                print(f"returns-fetch-model: {exc}; retrying", file=sys.stderr)
                time.sleep(2 ** (attempt + 1))
        if actual != sha256:
            raise ChecksumMismatch(f"{source}: SHA-256 {actual} does not match the pinned {sha256} "
                                   "(model.sha256): refusing this archive")
        folder = work / "version"
        folder.mkdir()
        unpack(tar_path, folder)
        record = {"source": source, "sha256": sha256,
                  "fetched_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        write_json(folder / RECORD, record)
        try:
            os.rename(folder, dest)  # atomic; replaces an empty folder (e.g. one a kubelet made for a subPath)
        except OSError:
            if not present(dest, sha256):  # another pod may have won the race with the same archive
                raise
        fsync_dir(dest.parent)
        return "fetched"
    except OSError as exc:
        raise DestinationError(f"{dest}: cannot write the version folder ({exc})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- command line -------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="returns-fetch-model",
        description="Make a model version folder available: fetch its tar when the folder is missing, "
                    "verify the SHA-256 against the pinned value and move it into place atomically.",
        epilog="Exit codes: 0 ok, 2 bad arguments, 3 download failed, 4 SHA-256 mismatch, 5 bad archive, "
               "6 missing without a source or holding another archive, 7 destination not writable.")
    p.add_argument("--dest", type=Path, required=True, help="the version folder, <model-root>/<name>/<version>")
    p.add_argument("--source", default="", help="http(s)://..., s3://<bucket>/<key> or a path to the version's tar; "
                                                 "empty: the folder must already exist")
    p.add_argument("--sha256", default="", help="pinned SHA-256 of the tar (64 hex digits); required with --source")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to connect and between reads (default 60)")
    p.add_argument("--retries", type=int, default=2, help="retries of a failed download (default 2)")
    p.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL", "")),
                   help="S3-compatible endpoint URL (default: AWS; env AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)")
    p.add_argument("--s3-region", default=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
                   help="signing region (default: AWS_REGION, AWS_DEFAULT_REGION or us-east-1)")
    return p


def _check(args: argparse.Namespace) -> None:
    sha = args.sha256.lower()
    if args.sha256 and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise BadArguments(f"--sha256 {args.sha256!r}: expected 64 hex digits")
    if args.source and not sha:
        raise BadArguments("--source needs --sha256 (the digest pinned in the chart's values, model.sha256)")
    if args.timeout <= 0 or args.retries < 0:
        raise BadArguments("--timeout must be > 0 and --retries >= 0")
    args.sha256 = sha


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        _check(args)
        if not args.source:
            if present(args.dest, args.sha256 or None):
                print(f"returns-fetch-model: {args.dest} present")
                return 0
            raise NotAvailable(f"{args.dest}: version folder missing and no source configured (model.source.url); "
                               "upload it or set a source")
        opts = FetchOptions(timeout=args.timeout, s3_endpoint=args.s3_endpoint, s3_region=args.s3_region,
                            retries=args.retries)
        outcome = fetch(args.dest, args.source, args.sha256, opts)
    except FetchError as exc:
        print(f"returns-fetch-model: ERROR ({type(exc).__name__}, exit {exc.exit_code}): {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"returns-fetch-model: {args.dest} {outcome} (sha256 {args.sha256})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
