"""returns_model/manifest.py on small files made here (no model, no torch): hashes, the check before
serving, the drift reference and `returns-verify-archive`'s exit codes. Fast enough for mutation
testing; tests/test_archive.py checks the same module on the real archive."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from returns_model.manifest import (REFERENCE_EDGES, ArchiveRefused, RuleReference, content_digest, main,
                                    make_reference, read_reference, sha256_file, tree_hashes, verify)


def model_root(tmp_path: Path, mar: bytes = b"PK fake archive", **overrides) -> Path:
    root = tmp_path / "root"
    (root / "model-store").mkdir(parents=True)
    (root / "model-store" / "returns-classifier.mar").write_bytes(mar)
    manifest = {"mar_file": "model-store/returns-classifier.mar", "mar_sha256": hashlib.sha256(mar).hexdigest(),
                "archive_content_sha256": "ab" * 32, **overrides}
    (root / "artifact_manifest.json").write_text(json.dumps(manifest))
    return root


def test_sha256_file_reads_files_larger_than_one_chunk(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: three 1 MiB chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_content_digest_is_over_sorted_name_hash_lines():
    files = {"b.py": "2" * 64, "a.json": "1" * 64}
    want = hashlib.sha256(f"a.json  {'1' * 64}\nb.py  {'2' * 64}\n".encode()).hexdigest()
    assert content_digest(files) == want == content_digest(dict(reversed(list(files.items()))))
    assert content_digest({}) == hashlib.sha256(b"").hexdigest()


def test_tree_hashes_names_posix_relative_files_and_skips_bytecode(tmp_path):
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_bytes(b"x = 1\n")
    (tmp_path / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / "pkg" / "__pycache__" / "notes.txt").write_bytes(b"a cache folder is skipped whole")
    (tmp_path / "stray.pyc").write_bytes(b"junk")
    (tmp_path / "model.json").write_bytes(b"{}")
    assert tree_hashes(tmp_path) == {"model.json": hashlib.sha256(b"{}").hexdigest(),
                                     "pkg/mod.py": hashlib.sha256(b"x = 1\n").hexdigest()}


def test_verify_accepts_an_intact_archive_and_returns_its_manifest(tmp_path):
    root = model_root(tmp_path)
    assert verify(root)["archive_content_sha256"] == "ab" * 32


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "model-store" / "returns-classifier.mar").write_bytes(b"PK fake archive!"),
     "does not match artifact_manifest.json .*; the archive was changed or copied incompletely: refusing to serve it"),
    (lambda r: (r / "model-store" / "returns-classifier.mar").unlink(), "is missing"),
    (lambda r: (r / "artifact_manifest.json").unlink(), "not found"),
    (lambda r: (r / "artifact_manifest.json").write_text("{not json"), "unreadable manifest"),
    (lambda r: (r / "artifact_manifest.json").write_text('{"mar_file": "x"}'), "unreadable manifest"),
    (lambda r: (r / "artifact_manifest.json").write_text('["a list"]'), "unreadable manifest"),
])
def test_verify_refuses_with_a_reason(tmp_path, damage, message):
    root = model_root(tmp_path)
    damage(root)
    with pytest.raises(ArchiveRefused, match=message):
        verify(root)


def test_verify_refuses_a_mar_file_outside_the_model_root(tmp_path):
    outside = tmp_path / "elsewhere.mar"
    outside.write_bytes(b"PK fake archive")
    root = model_root(tmp_path, mar_file="../elsewhere.mar")
    with pytest.raises(ArchiveRefused, match="points outside"):
        verify(root)


def test_verify_cli_exit_codes(tmp_path, capsys):
    root = model_root(tmp_path)
    assert main([str(root)]) == 0
    assert capsys.readouterr().out.startswith("returns-verify-archive: ok model-store/returns-classifier.mar")
    (root / "model-store" / "returns-classifier.mar").write_bytes(b"changed")
    assert main([str(root)]) == 1
    assert capsys.readouterr().err.startswith("returns-verify-archive: REFUSED: ")  # the command's own name


def test_make_reference_rounds_and_checks_the_histogram():
    ref = make_reference(["a", "b"], [0.1234567891, 0.8765432109], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 55, "val")
    assert ref == {"n": 55, "source": "val", "class_names": ["a", "b"], "class_distribution": [0.123457, 0.876543],
                   "confidence_histogram": {"edges": REFERENCE_EDGES, "counts": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}}
    assert len(REFERENCE_EDGES) == 11 and REFERENCE_EDGES[0] == 0.0 and REFERENCE_EDGES[-1] == 1.0
    assert REFERENCE_EDGES == sorted(REFERENCE_EDGES)
    with pytest.raises(ValueError, match="9 histogram counts for 10 bins"):
        make_reference(["a"], [1.0], [0] * 9, 1, "val")


def test_make_reference_keeps_the_gates_share_rounded_to_six_places():
    ref = make_reference(["a"], [1.0], [0] * 10, 1, "val", unfamiliar_rate=0.02345678912)
    assert ref["unfamiliar_rate"] == 0.023457
    assert "unfamiliar_rate" not in make_reference(["a"], [1.0], [0] * 10, 1, "val")


def test_read_reference_from_a_manifest_a_model_json_or_their_folder(tmp_path):
    body = {"class_distribution": [0.5, 0.5], "n": 10}
    manifest = {"reference": body, "archive_content_sha256": "ab" * 32, "mar_sha256": "cd" * 32}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "artifact_manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "m" / "model.json").write_text(json.dumps({"reference": {"class_distribution": [1.0]}}))
    ref = read_reference(tmp_path / "m")  # the manifest wins over model.json in a folder
    assert (ref.body, ref.archive_content_sha256, ref.mar_sha256) == (body, "ab" * 32, "cd" * 32)
    assert ref.source == str(tmp_path / "m" / "artifact_manifest.json")
    only = read_reference(tmp_path / "m" / "model.json")
    assert only.body == {"class_distribution": [1.0]} and only.archive_content_sha256 is None
    (tmp_path / "bare.json").write_text(json.dumps(body))  # a bare reference object
    assert read_reference(tmp_path / "bare.json").body == body
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "model.json").write_text(json.dumps({"reference": body}))
    assert read_reference(tmp_path / "n").source.endswith("model.json")


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "is not a JSON object"),
    ({"reference": "x"}, "has no reference.class_distribution"),
    ({"reference": {"class_distribution": "x"}}, "has no reference.class_distribution"),
    ({}, "has no reference.class_distribution"),
])
def test_read_reference_refuses_files_without_one(tmp_path, doc, message):
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as e:
        read_reference(tmp_path / "r.json")
    assert str(tmp_path / "r.json") in str(e.value)  # the message names the file


def ref_body(*mix: float, source: str = "val") -> dict:
    return {"n": 100, "source": source, "class_distribution": list(mix)}


def test_read_reference_of_a_model_json_has_the_float_and_the_int8_rules_reference(tmp_path):
    """A model.json (known by its arch) holds the float rule's reference at the top and the int8
    rule's in its int8 section; answers naming no rule are judged against the top-level one."""
    float_body, int8_body = ref_body(0.5, 0.5, source="float"), ref_body(0.9, 0.1, source="int8")
    doc = {"arch": {"name": "small_cnn"}, "reference": float_body, "int8": {"file": "model.int8.onnx",
                                                                             "reference": int8_body}}
    (tmp_path / "model.json").write_text(json.dumps(doc))
    ref = read_reference(tmp_path / "model.json")
    assert ref.by_rule == {"float": float_body, "int8": int8_body} and ref.body == float_body
    assert ref.for_rule("float") == RuleReference(float_body, "reference", fallback=False)
    assert ref.for_rule("int8") == RuleReference(int8_body, "int8.reference", fallback=False)
    assert ref.for_rule(None) == RuleReference(float_body, "reference", fallback=True)
    for without in ({}, None):  # an int8 section without its own reference (empty or absent): its answers fall back
        doc["int8"]["reference"] = without
        if without is None:
            del doc["int8"]["reference"]
        (tmp_path / "model.json").write_text(json.dumps(doc))
        ref = read_reference(tmp_path)
        assert ref.by_rule == {"float": float_body}
        assert ref.for_rule("int8") == RuleReference(float_body, "reference", fallback=True)


def test_read_reference_of_a_manifest_reads_each_rules_reference_from_references(tmp_path):
    float_body, int8_body = ref_body(0.5, 0.5, source="float"), ref_body(0.9, 0.1, source="int8")
    manifest = {"served_rule": "int8", "reference": int8_body, "references": {"float": float_body, "int8": int8_body},
                "archive_content_sha256": "ab" * 32, "mar_sha256": "cd" * 32, "mar_file": "model-store/x.mar"}
    (tmp_path / "artifact_manifest.json").write_text(json.dumps(manifest))
    ref = read_reference(tmp_path)
    assert ref.body == int8_body and ref.by_rule == {"float": float_body, "int8": int8_body}
    assert ref.for_rule("float") == RuleReference(float_body, "references.float", fallback=False)
    assert ref.for_rule("int8") == RuleReference(int8_body, "references.int8", fallback=False)
    assert ref.for_rule(None).fallback and ref.for_rule(None).body == int8_body
    manifest["references"] = {"float": float_body}  # a rule the archive cannot serve: the single reference
    (tmp_path / "artifact_manifest.json").write_text(json.dumps(manifest))
    assert read_reference(tmp_path).for_rule("int8") == RuleReference(int8_body, "reference", fallback=True)


def test_a_file_without_per_rule_references_judges_every_rule_against_its_one_reference(tmp_path):
    single = ref_body(0.5, 0.5)
    (tmp_path / "artifact_manifest.json").write_text(json.dumps({"reference": single, "mar_sha256": "cd" * 32}))
    ref = read_reference(tmp_path)
    assert ref.by_rule == {} and ref.body == single
    assert {r: ref.for_rule(r) for r in ("float", "int8", None)} == {
        r: RuleReference(single, "reference", fallback=True) for r in ("float", "int8", None)}


@pytest.mark.parametrize("doc, message", [
    ({"reference": {"class_distribution": [1.0]}, "references": [1]},
     "references must be an object mapping a rule \\(float, int8\\) to its reference, not list"),
    ({"reference": {"class_distribution": [1.0]}, "references": {"int8": {"n": 3}}},
     "has no references.int8.class_distribution \\(the reference of the int8 rule\\)"),
    ({"arch": {}, "reference": {"class_distribution": [1.0]}, "int8": {"reference": "x"}},
     "has no int8.reference.class_distribution \\(the reference of the int8 rule\\)"),
])
def test_read_reference_refuses_a_per_rule_reference_that_is_not_one(tmp_path, doc, message):
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as e:
        read_reference(tmp_path / "r.json")
    assert str(e.value).startswith(str(tmp_path / "r.json"))


def test_read_reference_of_a_folder_without_either_file_is_an_os_error(tmp_path):
    with pytest.raises(OSError):  # what --reference turns into a clear bad-argument error
        read_reference(tmp_path)


def test_verify_cli_names_itself_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: returns-verify-archive") and "artifact_manifest.json" in out
    assert "Verify a model root's .mar against its artifact_manifest.json." in out
    assert "folder with artifact_manifest.json and model-store/" in out
