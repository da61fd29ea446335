"""The shipped server config keeps management and registration out of reach."""
import socket

import psutil
import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def non_loopback_ipv4() -> list[str]:
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def listening(pid: int) -> dict[int, str]:
    """port -> bound address of the TorchServe frontend's listening sockets."""
    out = {}
    for c in psutil.Process(pid).net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN:
            out[c.laddr.port] = c.laddr.ip
    return out


def test_management_and_grpc_bound_to_loopback_only(torchserve):
    ports = listening(torchserve.frontend_pid)
    loopback = ("127.0.0.1", "::ffff:127.0.0.1")  # Java may bind an IPv4-mapped dual-stack socket
    assert ports[torchserve.ports["management"]] in loopback
    assert ports[torchserve.ports["grpc_mgmt"]] in loopback
    for ip in non_loopback_ipv4():  # where the machine has another address, prove it is refused there
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((ip, torchserve.ports["management"])) != 0, ip


def test_model_and_workflow_registration_are_off(torchserve):
    mgmt = torchserve.management_url
    # A loopback URL: even a misconfiguration would send no traffic off this machine.
    r = requests.post(f"{mgmt}/models", params={"url": "http://127.0.0.1:9/evil.mar"}, timeout=10)
    assert r.status_code in (403, 405), r.text
    r = requests.delete(f"{mgmt}/models/returns-classifier", timeout=10)
    assert r.status_code in (403, 405), r.text
    r = requests.post(f"{mgmt}/workflows", params={"url": "http://127.0.0.1:9/evil.war"}, timeout=10)
    assert r.status_code in (400, 403, 404, 405), r.text
    assert torchserve.is_ready()  # the model is still there


def test_shipped_config_values(model_root):
    text = (model_root / "config" / "config.properties").read_text()
    assert "management_address=http://127.0.0.1:" in text
    assert "enable_model_api=false" in text and "install_py_dep_per_model=false" in text
    assert "allowed_urls=^file:///mnt/models/model-store/" in text


def test_our_loader_never_unpickles_objects(release_model_dir, tmp_path):
    """returns_model.artifact.load_model (what the handler and training use) refuses a model.pt that
    carries pickled code, and the code never runs."""
    import os
    import shutil

    import torch

    from returns_model.artifact import load_model

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(release_model_dir / "model.json", folder / "model.json")
    state = torch.load(release_model_dir / "model.pt", weights_only=True)
    torch.save({**state, "x": Evil()}, folder / "model.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_model(folder)
    assert not marker.exists()
    load_model(release_model_dir)  # the real weights still load


def test_tampered_archive_is_not_served(model_root, tmp_path):
    import shutil

    from scripts.localserve import LocalTorchServe, ServerError

    copy = tmp_path / "root"
    shutil.copytree(model_root, copy)
    mar = copy / "model-store" / "returns-classifier.mar"
    mar.write_bytes(mar.read_bytes() + b"\x00")
    server = LocalTorchServe(copy, workdir=tmp_path / "ts")
    try:
        with pytest.raises(ServerError, match="refusing to serve"):
            server.start(timeout=60)
        assert server.proc is None
    finally:
        server.stop()  # never leave a TorchServe behind, whatever failed above
