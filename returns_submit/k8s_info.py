"""Where the run ran, when inside Kubernetes: pod, node and container image digests.

Read through the `kubernetes` client (imported only here, only inside a cluster) with
the pod's service account; the chart grants it `get` on its own pods. Any failure is
reported in the result rather than failing the nightly run.
"""
from __future__ import annotations

import os
from pathlib import Path

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def pod_info(environ=None) -> dict | None:
    """None outside Kubernetes; else {pod, namespace, node, containers: [{name, image, image_id}]}."""
    environ = os.environ if environ is None else environ
    if not environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    pod = environ.get("POD_NAME") or environ.get("HOSTNAME", "")
    namespace = environ.get("POD_NAMESPACE") or _read(NAMESPACE_FILE) or "default"
    info: dict = {"pod": pod, "namespace": namespace, "node": environ.get("NODE_NAME")}
    try:
        from kubernetes import client, config  # only in the cluster: the image may lack it elsewhere

        config.load_incluster_config()
        v1 = client.CoreV1Api()
        obj = v1.read_namespaced_pod(name=pod, namespace=namespace, _request_timeout=10)
        info["node"] = obj.spec.node_name
        info["containers"] = [
            {"name": s.name, "image": s.image, "image_id": s.image_id}
            for s in (obj.status.container_statuses or [])
        ]
    except Exception as e:  # noqa: BLE001 - metadata only; the run must not fail on it
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
