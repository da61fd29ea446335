"""Render the Helm chart with the real Helm v4 engine and validate what it renders.

One module for both users: `scripts.render_k8s` (the plain manifests in k8s/) and the chart
tests. Rendering goes through helm-python-sdk (`helm_python`), i.e. Helm's own Go engine with
the chart's values.schema.json, so there is no helm binary and no cluster. Validation uses
kubernetes-validate's schemas for built-in kinds and the CRD schemas kept in ../shared/crds
for the InferenceService and the ServiceMonitor.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = REPO_ROOT / "helm" / "returns-classifier"
CI_VALUES_DIR = CHART_DIR / "ci"
# In CI a fresh clone sits next to shared/, which holds the CRD schemas.
CRD_DIR = REPO_ROOT.parent / "shared" / "crds"

RELEASE_NAME = "returns-classifier"
NAMESPACE = "returns-classifier"
# Kubernetes versions the objects are validated against: the newest kubernetes-validate ships
# and the oldest the chart supports (Chart.yaml's kubeVersion, read by min_kube_version()).
KUBE_VERSION = "1.37.0"

# CRD file per custom resource (apiVersion, kind); the schema is spec.versions[<served version>].
CRD_FILES: dict[tuple[str, str], str] = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ValidationFailed(Exception):
    """An object does not match its Kubernetes or CRD schema."""


@dataclass
class Rendered:
    """The outcome of one `helm template`: objects in template order, NOTES.txt, raw texts."""

    objects: list[dict[str, Any]]
    notes: str
    documents: list[tuple[str, str]] = field(default_factory=list)  # (template path, YAML text)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        if len(found) != 1:
            raise LookupError(f"expected one {kind}, found {len(found)}")
        return found[0]


def min_kube_version(chart_dir: Path = CHART_DIR) -> str:
    """The lower bound of Chart.yaml's kubeVersion constraint, e.g. ">=1.31.0-0" -> "1.31.0"."""
    chart = yaml.load((chart_dir / "Chart.yaml").read_text(encoding="utf-8"), Loader=_Loader)
    match = re.search(r">=\s*v?(\d+\.\d+(?:\.\d+)?)", chart.get("kubeVersion", ""))
    if not match:
        raise ValueError(f"{chart_dir / 'Chart.yaml'}: kubeVersion has no lower bound")
    return match.group(1)


def is_hook(obj: Mapping[str, Any]) -> bool:
    """True for Helm hooks (the `helm test` pod), which are not part of the installed release."""
    return "helm.sh/hook" in (obj.get("metadata", {}).get("annotations") or {})


def load_values_file(path: Path) -> dict[str, Any]:
    """Parse a values file the way `helm -f` does."""
    import helm_python as helm

    return helm.values_from_yaml(Path(path).read_text(encoding="utf-8"))


def ci_values_files() -> list[Path]:
    """The chart's ci/*-values.yaml feature matrix, sorted."""
    return sorted(CI_VALUES_DIR.glob("*-values.yaml"))


def render(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE_NAME,
    namespace: str = NAMESPACE,
    chart_dir: Path = CHART_DIR,
) -> Rendered:
    """Render the chart offline with Helm's engine (values are checked by values.schema.json).

    Raises:
        helm_python.HelmValuesError: the values do not match values.schema.json.
        helm_python.HelmRenderError: a template failed (e.g. a `required` value is missing).
    """
    import helm_python as helm

    helm.validate_release_name(release)
    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render(dict(values or {}), name=release, namespace=namespace, is_install=True)
    notes = ""
    objects: list[dict[str, Any]] = []
    documents: list[tuple[str, str]] = []
    for path in sorted(manifests):
        text = manifests[path]
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in split_documents(text):
            obj = yaml.load(doc, Loader=_Loader)
            if obj:  # a template that rendered only comments or nothing
                objects.append(obj)
                documents.append((path, doc))
    return Rendered(objects=objects, notes=notes, documents=documents)


def split_documents(text: str) -> list[str]:
    """Split a rendered template into its YAML documents, text kept as Helm wrote it."""
    docs, current = [], []
    for line in text.splitlines():
        if line.rstrip() == "---":
            docs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current))
    return [d.strip("\n") + "\n" for d in docs if d.strip()]


def lint(values: Mapping[str, Any] | None = None, *, chart_dir: Path = CHART_DIR) -> list[str]:
    """`helm lint --strict` for the given values; returns the warnings and errors (empty = clean)."""
    import helm_python as helm

    report = helm.lint(chart_dir, dict(values or {}), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]


# --- validation -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kube_validator(version: str, api_version: str, kind: str) -> Any:
    """A cached strict validator for one built-in kind (kubernetes-validate's schemas).

    kubernetes_validate.validate() re-reads the 1.8 MB definitions file on every call; the same
    schemas are used here once per kind, which keeps the tests fast.
    """
    import jsonschema
    import referencing
    from kubernetes_validate import utils as kv

    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    # rbac.authorization.k8s.io/v1 -> rbac-v1, apps/v1 -> apps-v1, v1 -> v1 (kubernetes-validate's file names)
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv.schema_contents(f"{schema_dir}/{kind.lower()}-{group_version}.json", version)
    except FileNotFoundError:
        raise ValidationFailed(f"no Kubernetes {version} schema for {api_version} {kind}") from None
    definitions = kv.schema_contents(f"{schema_dir}/_definitions.json", version)
    registry = referencing.Registry().with_resource(
        definitions["$id"], referencing.Resource.from_contents(definitions)
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _strict(schema: Any) -> Any:
    """Copy of an OpenAPI v3 CRD schema where objects with listed properties reject unknown
    fields, as the API server does with strict field validation (kubectl's default)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd_validator(api_version: str, kind: str) -> Any:
    import jsonschema

    try:
        filename = CRD_FILES[(api_version, kind)]
    except KeyError:
        raise ValidationFailed(f"no CRD schema known for {api_version} {kind}") from None
    path = CRD_DIR / filename
    if not path.is_file():
        raise ValidationFailed(f"CRD schema {path} is missing (expected next to the repository in shared/crds)")
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    version = api_version.split("/")[1]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(entry["schema"]["openAPIV3Schema"])
    schema = _strict(schema)
    # metadata is only "type: object" in a CRD; validate_object() checks it as an ObjectMeta.
    schema["properties"]["metadata"] = {"type": "object"}
    # OpenAPI v3.0 schemas follow draft 4 semantics (boolean exclusiveMinimum, no const).
    return jsonschema.Draft4Validator(schema)


def _errors(validator: Any, obj: Mapping[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message[:300]}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def is_custom(obj: Mapping[str, Any]) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in CRD_FILES


def validate_object(obj: Mapping[str, Any], kube_version: str = KUBE_VERSION) -> list[str]:
    """Schema errors of one object (empty = valid): Kubernetes' strict schema for built-in
    kinds, the CRD schema (unknown fields rejected) for custom resources."""
    if is_custom(obj):
        meta = _errors(_kube_validator(kube_version, "meta/v1", "ObjectMeta"), obj.get("metadata", {}))
        return _errors(_crd_validator(obj["apiVersion"], obj["kind"]), obj) + [f"metadata.{e}" for e in meta]
    return _errors(_kube_validator(kube_version, obj["apiVersion"], obj["kind"]), obj)


def validate_objects(objects: Iterable[Mapping[str, Any]], kube_versions: Iterable[str] | None = None) -> list[str]:
    """Errors of all objects (empty = all valid), each prefixed with kind/name and the schema
    version; built-in kinds are checked for the chart's oldest and the newest Kubernetes."""
    kube_versions = list(kube_versions or (min_kube_version(), KUBE_VERSION))
    problems = []
    seen: set[str] = set()
    for obj in objects:
        key = json.dumps(obj, sort_keys=True)
        if key in seen:  # identical objects across renders are validated once
            continue
        seen.add(key)
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        versions = ["crd"] if is_custom(obj) else kube_versions
        for version in versions:
            errs = validate_object(obj) if version == "crd" else validate_object(obj, version)
            problems += [f"{name} ({version}): {e}" for e in errs]
    return problems
