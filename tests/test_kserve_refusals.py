"""`returns-kserve` refuses a model root it cannot serve with one line naming the folder and what is
wrong, and exit 3 (docs/exit-codes.md); a flag it cannot use stays exit 2. In this process: each
refusal comes before any server starts."""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("kserve")
from handler.kserve_predictor import main
EXIT_BAD_FLAGS, EXIT_REFUSED = 2, 3
from returns_model.names import MANIFEST_FILE, MAR_FILE, META_FILE, MODEL_CONFIG_FILE, MODEL_STORE, WEIGHTS_FILE  # noqa: E402


def refusal(caplog, folder: Path) -> str:
    """The one log line of the refusal, checked to name the folder."""
    lines = [r.getMessage() for r in caplog.records if "refusing to serve" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "\n" not in lines[0] and lines[0].startswith(f"returns-kserve: refusing to serve {folder}")
    return lines[0]


@pytest.fixture
def folder(release_model_dir, tmp_path) -> Path:
    """A copy of the release model folder, on the eager path (no graph to export: quick)."""
    out = tmp_path / "model"
    shutil.copytree(release_model_dir, out)
    (out / MODEL_CONFIG_FILE).write_text("handler:\n  cpu_backend: eager\n")
    return out


def serve(folder: Path) -> int:
    return main(["--model_dir", str(folder), "--device", "cpu"])


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def test_missing_weights(folder, caplog):
    (folder / WEIGHTS_FILE).unlink()
    assert serve(folder) == EXIT_REFUSED
    assert f"{folder / WEIGHTS_FILE}: weights not found" in refusal(caplog, folder)


def test_weights_of_another_network_on_one_line(folder, caplog):
    torch.save({"stem.0.weight": torch.zeros(1)}, folder / WEIGHTS_FILE)
    assert serve(folder) == EXIT_REFUSED
    line = refusal(caplog, folder)
    assert "weights do not fit the architecture in model.json" in line and "Missing key(s)" in line


def test_damaged_weights(folder, caplog):
    (folder / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:1000])
    assert serve(folder) == EXIT_REFUSED
    assert "not weights that torch.load(weights_only=True) can read" in refusal(caplog, folder)


def test_malformed_model_json(folder, caplog):
    (folder / META_FILE).write_text("{")
    assert serve(folder) == EXIT_REFUSED
    assert f"{folder / META_FILE}: malformed model metadata" in refusal(caplog, folder)


def test_malformed_gate(folder, caplog):
    """A GateError (a ValueError) was exit 2, as if a flag were wrong."""
    edit_meta(folder, lambda m: m["unfamiliar"].update(format="other"))
    assert serve(folder) == EXIT_REFUSED
    assert "gate format 'other'" in refusal(caplog, folder)


def test_a_float_probe_that_no_runtime_here_reproduces(folder, caplog):
    edit_meta(folder, lambda m: m["probe"].update(logits=m["probe"]["logits"][::-1]))
    assert serve(folder) == EXIT_REFUSED
    assert "this device cannot serve the float rule as certified" in refusal(caplog, folder)


@pytest.mark.parametrize("config, wrong", [
    ("handler:\n  max_instances: many\n", "not a model-config.yaml the handler can use"),
    ("handler: [\n", "not a model-config.yaml the handler can use"),
    ("- a list\n", "not a model-config.yaml the handler can use"),
    ("handler:\n  cpu_backend: gpu\n", "handler.cpu_backend must be one of onnx, onnx-int8, eager, not 'gpu'"),
])
def test_a_model_config_the_handler_cannot_use(folder, caplog, config, wrong):
    """The archive's own settings: exit 3 (was 2, the flags' code)."""
    (folder / MODEL_CONFIG_FILE).write_text(config)
    assert serve(folder) == EXIT_REFUSED
    assert f"{folder / MODEL_CONFIG_FILE}: {wrong}" in refusal(caplog, folder)


def archive_root(tmp_path: Path, mar: bytes, sha256: str | None = None) -> Path:
    root = tmp_path / "root"
    (root / MODEL_STORE).mkdir(parents=True)
    (root / MODEL_STORE / MAR_FILE).write_bytes(mar)
    manifest = {"mar_file": f"{MODEL_STORE}/{MAR_FILE}", "mar_sha256": sha256 or hashlib.sha256(mar).hexdigest()}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    return root


def test_an_archive_that_differs_from_its_manifest(tmp_path, caplog):
    root = archive_root(tmp_path, b"changed", sha256="0" * 64)
    assert serve(root) == EXIT_REFUSED
    assert "does not match artifact_manifest.json" in refusal(caplog, root)


def test_an_archive_that_is_not_a_zip(tmp_path, caplog):
    root = archive_root(tmp_path, b"not a zip")
    assert serve(root) == EXIT_REFUSED
    assert f"{root / MODEL_STORE / MAR_FILE}: cannot be extracted (BadZipFile" in refusal(caplog, root)


def test_an_extracted_archive_names_where_it_was_extracted(tmp_path, caplog, release_model_dir):
    buf = tmp_path / "m.mar"
    with zipfile.ZipFile(buf, "w") as z:
        z.write(release_model_dir / META_FILE, META_FILE)  # no model.pt
    root = archive_root(tmp_path, buf.read_bytes())
    assert serve(root) == EXIT_REFUSED
    line = refusal(caplog, root)
    assert " (its .mar extracted to " in line and "weights not found" in line


def test_no_model_root_at_all(tmp_path, caplog):
    assert serve(tmp_path / "nothing") == EXIT_REFUSED
    assert f"{tmp_path / 'nothing' / MANIFEST_FILE}: not found" in refusal(caplog, tmp_path / "nothing")


@pytest.mark.parametrize("flags, wrong", [
    (["--workers", "2"], "--workers must be 1"),
    (["--lanes", "-1"], "--lanes must be 0 (the archive's worker count) or more, not -1"),
])
def test_a_flag_it_cannot_use_is_still_exit_2_and_checked_first(tmp_path, caplog, flags, wrong):
    assert main(["--model_dir", str(tmp_path / "nothing"), *flags]) == EXIT_BAD_FLAGS
    assert f"returns-kserve: {wrong}" in caplog.text and "refusing to serve" not in caplog.text
