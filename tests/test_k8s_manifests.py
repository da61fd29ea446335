"""The plain manifests in k8s/ are generated from the chart and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scripts import helm_render as hr
from scripts import render_k8s

pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (make setup)")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tree() -> dict[str, dict[str, str]]:
    return render_k8s.expected_tree()


def load_variant(folder: Path) -> list[dict]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    objects = []
    for name in kustomization["resources"]:
        objects += [o for o in yaml.safe_load_all((folder / name).read_text(encoding="utf-8")) if o]
    return objects


def test_k8s_is_up_to_date_with_the_chart(tree: dict[str, dict[str, str]]) -> None:
    problems = render_k8s.differences(render_k8s.DEFAULT_OUTPUT, tree)
    assert problems == [], "k8s/ is out of date, run `make k8s`:\n" + "\n".join(problems)


def test_check_mode_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k8s"
    assert render_k8s.main(["--output", str(out)]) == 0
    assert render_k8s.main(["--output", str(out), "--check"]) == 0
    deployment = out / "torchserve-gpu" / "deployment.yaml"
    deployment.write_text(deployment.read_text(encoding="utf-8").replace("replicas: 1", "replicas: 3"), encoding="utf-8")
    assert render_k8s.main(["--output", str(out), "--check"]) == 1
    assert "torchserve-gpu/deployment.yaml: differs from the chart" in capsys.readouterr().err
    assert render_k8s.main(["--output", str(out)]) == 0  # regenerating repairs it
    (out / "kserve" / "old-service.yaml").write_text("kind: Service\n", encoding="utf-8")
    (out / "kserve" / "cronjob.yaml").unlink()
    assert render_k8s.main(["--output", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert "kserve/old-service.yaml: stale file" in err and "kserve/cronjob.yaml: missing" in err
    assert render_k8s.main(["--output", str(out)]) == 0
    assert not (out / "kserve" / "old-service.yaml").exists()
    assert render_k8s.main(["--output", str(out), "--check"]) == 0


@pytest.mark.parametrize("variant", ["torchserve-gpu", "torchserve-cpu", "kserve"])
def test_each_variant_is_a_kustomize_root(variant: str) -> None:
    folder = render_k8s.DEFAULT_OUTPUT / variant
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization" and kustomization["namespace"] == hr.NAMESPACE
    files = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert kustomization["resources"] == files
    for name in files:  # one file per kind
        kinds = {o["kind"] for o in yaml.safe_load_all((folder / name).read_text(encoding="utf-8")) if o}
        assert [k.lower() + ".yaml" for k in kinds] == [name]
    objects = load_variant(folder)
    assert not [o for o in objects if hr.is_hook(o)]  # the helm test pod stays in the chart
    assert hr.validate_objects([o for o in objects if not hr.is_custom(o)]) == []


def test_variants_differ_where_they_should() -> None:
    def objects(variant: str) -> dict[str, dict]:
        return {o["kind"]: o for o in load_variant(render_k8s.DEFAULT_OUTPUT / variant)}

    gpu, cpu, kserve = objects("torchserve-gpu"), objects("torchserve-cpu"), objects("kserve")
    gpu_limits = gpu["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu_server = cpu["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu_limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu_server["resources"]["limits"]
    assert cpu_server["image"].endswith("/returns-classifier/torchserve:1.0.0-cpu")
    assert "InferenceService" in kserve and not {"Deployment", "Service"} & set(kserve)
    (predictor,) = kserve["InferenceService"]["spec"]["predictor"]["containers"]  # the predictor runtime
    assert predictor["command"] == ["returns-kserve"] and predictor["image"].endswith("/returns-classifier/predictor:1.0.0")
    for variant in (gpu, cpu, kserve):
        assert variant["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"
        assert "NetworkPolicy" in variant


def test_custom_resources_in_k8s_match_their_crds() -> None:
    """The kustomize folders' custom resources (KServe's InferenceService), checked against
    ../shared/crds: a clear skip or, in CI, a failure when the schemas are missing."""
    from tests.test_helm_chart import require_crds

    custom = [o for v in ("torchserve-gpu", "torchserve-cpu", "kserve")
              for o in load_variant(render_k8s.DEFAULT_OUTPUT / v) if hr.is_custom(o)]
    assert "InferenceService" in {o["kind"] for o in custom}
    require_crds()
    assert hr.validate_objects(custom) == []
