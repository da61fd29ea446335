"""Shared fixtures: real Fashion-MNIST test images, the release model archived, a real TorchServe."""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from training.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, read_idx

REPO = Path(__file__).resolve().parents[1]

# kserve parses sys.argv when it is imported (kserve.model_server); pytest's own flags must not reach
# it (`pytest --co` is an abbreviation of its --configure_logging). Import it once with no arguments.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve  # noqa: F401
except ImportError:  # the predictor's tests then fail with their own import error
    pass
finally:
    sys.argv = _argv


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Under mutmut's stats run only: collect the functions a test reached in the submitter
    subprocesses it started (tests/mutmut_bridge.py) and count them as reached by the test."""
    if os.environ.get("MUTANT_UNDER_TEST") != "stats":
        yield
        return
    import tempfile

    fd, hits = tempfile.mkstemp(prefix="mutmut-hits-")
    os.close(fd)
    os.environ["RETURNS_MUTMUT_HITS"] = hits
    try:
        yield
    finally:
        del os.environ["RETURNS_MUTMUT_HITS"]
        names = set(Path(hits).read_text().split())
        os.unlink(hits)
        from mutmut.state import state

        state()._stats.update(names)


# The committed release model; RETURNS_TEST_MODEL_DIR points tests at another trained model folder.
RELEASE_MODEL = Path(os.environ.get("RETURNS_TEST_MODEL_DIR", REPO / "models" / "release"))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA; none on this machine")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)
    _quickest_first_under_a_mutant(items)


def _quickest_first_under_a_mutant(items) -> None:
    """While mutmut tests a mutant (it stops at the first failure), run the quickest tests first,
    by the durations its stats run measured: most mutants then die in a fraction of a second
    instead of after a multi-second SIGKILL test that happened to come first."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant or not Path("mutmut-stats.json").exists():
        return
    import json

    durations = json.loads(Path("mutmut-stats.json").read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


@pytest.fixture(scope="session")
def fmnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The real Fashion-MNIST test split: uint8 images [10000, 28, 28] and labels."""
    images, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    return images, labels.long()


def encode(pixels: torch.Tensor, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def one_decision(fmnist_test, tmp_path):
    """returns-retrain's --decisions and --photos for one decided test photo (a Coat)."""
    photo = encode(fmnist_test[0][0])
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(photo)
    decision = {"format_version": 1, "sha256": hashlib.sha256(photo).hexdigest(), "label": "Coat",
                "reviewer": "ana", "decided_at": "2024-05-02T09:14:00Z"}
    (tmp_path / "d.jsonl").write_text(json.dumps(decision) + "\n")
    return ["--decisions", str(tmp_path / "d.jsonl"), "--photos", str(tmp_path / "photos")]


@pytest.fixture(scope="session")
def fmnist_png(fmnist_test) -> Callable[[int], bytes]:
    """``i -> PNG bytes`` of test image i."""
    images, _ = fmnist_test
    return lambda i: encode(images[i])


@pytest.fixture(scope="session")
def fmnist_pngs(fmnist_test) -> Callable[[int, Path], list[tuple[Path, str]]]:
    """``(n, folder) -> [(path, label name)]``: the first n test images written as PNG files."""
    images, labels = fmnist_test

    def write(n: int, folder: Path, start: int = 0) -> list[tuple[Path, str]]:
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for i in range(start, start + n):
            path = folder / f"item_{i:05d}.png"
            path.write_bytes(encode(images[i]))
            out.append((path, FASHION_MNIST_CLASSES[int(labels[i])]))
        return out

    return write


@pytest.fixture(scope="session")
def release_model_dir() -> Path:
    if not (RELEASE_MODEL / "model.pt").exists():
        pytest.fail(f"{RELEASE_MODEL}: no trained model; run `make train` (the release model is committed)")
    return RELEASE_MODEL


@pytest.fixture(scope="session")
def classifier(release_model_dir):
    """The handler's core on the release model, in this process (no TorchServe)."""
    from handler.core import Classifier

    return Classifier(release_model_dir, warmup=False)


@pytest.fixture(scope="session")
def model_root(release_model_dir, tmp_path_factory) -> Path:
    """The release model packaged by `make archive`'s code into a temporary model root."""
    from training.archive import build_archive

    root = tmp_path_factory.mktemp("model_root")
    build_archive(release_model_dir, root)
    return root


@pytest.fixture(scope="session")
def torchserve(release_model_dir, tmp_path_factory):
    """One real TorchServe on loopback for the session (tests that stop or kill it start their own).

    Its archive merges up to 4 concurrent requests into one handler call (the shipped default is 1,
    since returns-submit fills each request): the handler's harder path, answers split back per request.
    It serves the float graph (``cpu_backend: onnx``), so its answers compare with the float oracle;
    the default int8 path is served and checked against its own oracle in tests/test_int8_path.py."""
    from handler.serve_config import ServeConfig
    from scripts.localserve import LocalTorchServe
    from training.archive import build_archive

    root = tmp_path_factory.mktemp("model_root_batching")
    build_archive(release_model_dir, root, ServeConfig(batch_size=4, cpu_backend="onnx"))
    server = LocalTorchServe(root, workdir=tmp_path_factory.mktemp("torchserve"))
    server.start(timeout=240)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def oracle(release_model_dir):
    """model.json's answers computed independently of the handler (tests/oracle.py)."""
    from tests.oracle import Oracle

    return Oracle(release_model_dir)


@pytest.fixture(scope="session")
def spread_photos(oracle, fmnist_test):
    """``[(Expected, PNG bytes)]``: real test photos over the whole confidence range, near the
    threshold included, each with the answer model.json prescribes for it."""
    from tests.oracle import spread_sample

    images, _ = fmnist_test
    sample = spread_sample(oracle, images)
    return [(e, encode(images[e.index])) for e in sample]


@pytest.fixture
def server():
    """A fake inference server on loopback (tests/submit_fixtures.py), one per test."""
    from tests.submit_fixtures import FakeInferenceServer

    with FakeInferenceServer() as s:
        yield s
