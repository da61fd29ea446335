"""The archive: layout, contents, hashes, and refusal of a tampered .mar."""
import json
import zipfile

import pytest
import yaml

from returns_model.manifest import ArchiveRefused, verify
from returns_model.manifest import sha256_file
from training.archive import mar_file_hashes
from returns_model.manifest import content_digest, tree_hashes


def test_layout_and_manifest_hashes(model_root, release_model_dir):
    mar = model_root / "model-store" / "returns-classifier.mar"
    assert (model_root / "config" / "config.properties").is_file()
    assert (model_root / "config" / "metrics.yaml").is_file()
    manifest = json.loads((model_root / "artifact_manifest.json").read_text())
    assert manifest["mar_sha256"] == sha256_file(mar)
    assert manifest["files"] == mar_file_hashes(mar)
    assert manifest["archive_content_sha256"] == content_digest(manifest["files"])
    for key in ("data_snapshot_sha256", "git_commit", "versions", "train_config", "metrics", "reference"):
        assert manifest[key], key
    assert manifest["versions"]["torch"].startswith("2.14.1")
    # the release's model.json says parent_model_sha256 (written before the weights digest had its own
    # name); the manifest, written now, names it as lineages are written today, with the same value
    meta = json.loads((release_model_dir / "model.json").read_text())
    assert manifest["lineage"]["parent_weights_sha256"] == meta["lineage"]["parent_model_sha256"]
    assert manifest["lineage"]["root"]["weights_sha256"] == meta["lineage"]["root"]["model_sha256"]
    assert "parent_model_sha256" not in manifest["lineage"]


def test_mar_carries_everything_serving_needs(model_root, release_model_dir, tmp_path):
    mar = model_root / "model-store" / "returns-classifier.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        assert {"model.pt", "model.json", "model-config.yaml", "torchserve_handler.py", "returns_model/meta.py",
                "returns_model/preprocess.py", "returns_model/network.py", "handler/core.py", "MAR-INF/MANIFEST.json"} <= names
        assert not any(n.startswith(("training/", "returns_submit/", "scripts/")) for n in names)  # only what serving imports
        serve_cfg = yaml.safe_load(z.read("model-config.yaml"))
        meta = json.loads(z.read("model.json"))
        z.extractall(tmp_path)
    assert serve_cfg["batchSize"] >= 1 and serve_cfg["maxBatchDelay"] >= 0 and serve_cfg["minWorkers"] >= 1
    assert serve_cfg["handler"]["max_instances"] >= 64
    assert meta["calibration"]["temperature"] > 0 and 0 < meta["calibration"]["threshold"] <= 1
    assert meta == json.loads((release_model_dir / "model.json").read_text())
    # What the handler reports as model_sha256 (the archive's content digest) is what the manifest records.
    manifest = json.loads((model_root / "artifact_manifest.json").read_text())
    assert content_digest(tree_hashes(tmp_path)) == manifest["archive_content_sha256"]


def test_weights_are_a_plain_state_dict(model_root, tmp_path):
    import torch

    with zipfile.ZipFile(model_root / "model-store" / "returns-classifier.mar") as z:
        (tmp_path / "model.pt").write_bytes(z.read("model.pt"))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def test_server_config_is_locked_down(model_root):
    props = dict(line.split("=", 1) for line in (model_root / "config" / "config.properties").read_text().splitlines()
                 if "=" in line and not line.startswith("#"))
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false"
    assert props["install_py_dep_per_model"] == "false"
    assert "http" not in props["allowed_urls"]
    assert json.loads(props["model_snapshot"])["models"]["returns-classifier"]
    assert int(props["max_request_size"]) >= 16 * 1024 * 1024


def test_tampered_archive_is_refused(model_root, tmp_path):
    import shutil

    copy = tmp_path / "root"
    shutil.copytree(model_root, copy)
    mar = copy / "model-store" / "returns-classifier.mar"
    verify(copy)  # intact: accepted
    data = bytearray(mar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mar.write_bytes(bytes(data))
    with pytest.raises(ArchiveRefused, match="does not match artifact_manifest.json"):
        verify(copy)


def test_the_same_model_folder_gives_a_byte_identical_mar(model_root, release_model_dir, tmp_path):
    """A SHA-256 pinned in the chart's values must mean one archive: no build times inside."""
    from training.archive import build_archive

    again = build_archive(release_model_dir, tmp_path / "again")
    first = json.loads((model_root / "artifact_manifest.json").read_text())
    assert again["mar_sha256"] == first["mar_sha256"]
    assert (tmp_path / "again" / "model-store" / "returns-classifier.mar").read_bytes() == \
        (model_root / "model-store" / "returns-classifier.mar").read_bytes()
    with zipfile.ZipFile(model_root / "model-store" / "returns-classifier.mar") as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert [i.filename for i in z.infolist()] == sorted(i.filename for i in z.infolist())


def test_the_mar_ships_every_project_module_its_handler_imports(model_root):
    """The serving pod has only the .mar: every project module that torchserve_handler.py reaches
    through imports must be inside it (the checkout's venv would hide a missing one in other tests)."""
    import ast

    with zipfile.ZipFile(model_root / "model-store" / "returns-classifier.mar") as z:
        shipped = {n[:-3].replace("/", ".") for n in z.namelist() if n.endswith(".py")}
        sources = {m: z.read(m.replace(".", "/") + ".py").decode() for m in shipped}
    missing = set()
    for module, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                if name.split(".")[0] in ("returns_model", "handler", "training", "returns_submit", "scripts") \
                        and name not in shipped and f"{name}.__init__" not in shipped:
                    missing.add(f"{module} imports {name}")
    assert not missing, sorted(missing)
