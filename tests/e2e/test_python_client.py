"""The official `kubernetes` Python client against a running `virtshift up`."""

from __future__ import annotations

import base64
import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.conftest import CORPUS
from virtshift.testing.platform import PlatformProcess

pytestmark = pytest.mark.e2e

G, V = "kubevirt.io", "v1"


def _api_client(kubeconfig: Path) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return client.ApiClient(cfg)


@pytest.fixture(scope="module")
def api(platform: PlatformProcess) -> Iterator[client.ApiClient]:
    c = _api_client(platform.kubeconfig)
    yield c
    c.close()


def _vm(name: str) -> dict:  # type: ignore[type-arg]
    vm = yaml.safe_load((CORPUS / "vm-cirros.yaml").read_text())
    vm["metadata"] = {"name": name, "labels": {"app": name}}
    return vm


def _settled(co: client.CustomObjectsApi, namespace: str, name: str,
             timeout: float = 30.0) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    last: dict | None = None  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        obj = co.get_namespaced_custom_object(G, V, namespace, "virtualmachines", name)
        if (obj.get("status") or {}).get("printableStatus") and last is not None and \
                last["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]:
            return obj  # type: ignore[no-any-return]
        last = obj
        time.sleep(0.05)
    raise AssertionError(f"VM {name} did not settle: {last}")


def test_custom_objects_crud(api: client.ApiClient, namespace: str) -> None:
    co = client.CustomObjectsApi(api)
    created = co.create_namespaced_custom_object(G, V, namespace, "virtualmachines", _vm("a"))
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1
    # The VM controller then adds its finalizer and status; once it is done, reads are stable.
    got = _settled(co, namespace, "a")
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    again = co.get_namespaced_custom_object(G, V, namespace, "virtualmachines", "a")
    assert again["metadata"]["resourceVersion"] == got["metadata"]["resourceVersion"]
    listed = co.list_namespaced_custom_object(G, V, namespace, "virtualmachines",
                                              label_selector="app=a")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["a"]
    got["spec"]["runStrategy"] = "Manual"  # still stopped: the VM controller leaves it be
    updated = co.replace_namespaced_custom_object(G, V, namespace, "virtualmachines", "a", got)
    assert updated["metadata"]["generation"] == 2
    assert int(updated["metadata"]["resourceVersion"]) > int(got["metadata"]["resourceVersion"])
    patched = co.patch_namespaced_custom_object(G, V, namespace, "virtualmachines", "a",
                                                {"metadata": {"labels": {"x": "y"}}})
    assert patched["metadata"]["labels"] == {"app": "a", "x": "y"}
    # Status goes through the status subresource only.
    st = co.patch_namespaced_custom_object_status(
        G, V, namespace, "virtualmachines", "a", {"status": {"printableStatus": "Stopped"}})
    assert st["status"]["printableStatus"] == "Stopped"
    ignored = co.patch_namespaced_custom_object(G, V, namespace, "virtualmachines", "a",
                                                {"status": {"printableStatus": "Running"}})
    assert ignored["status"]["printableStatus"] == "Stopped"
    co.delete_namespaced_custom_object(G, V, namespace, "virtualmachines", "a")
    # the VM controller's finalizer is removed promptly; then the VM is gone
    deadline = time.monotonic() + 30
    while True:
        try:
            co.get_namespaced_custom_object(G, V, namespace, "virtualmachines", "a")
        except ApiException as e:
            assert e.status == 404
            break
        assert time.monotonic() < deadline, "VM a was not deleted"
        time.sleep(0.05)


def test_core_v1_crud(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings"), data={"k": "v"})
    core.create_namespaced_config_map(namespace, cm)
    read = core.read_namespaced_config_map("settings", namespace)
    assert read.data == {"k": "v"}
    core.patch_namespaced_config_map("settings", namespace, {"data": {"k2": "v2"}})
    assert core.read_namespaced_config_map("settings", namespace).data == {"k": "v",
                                                                           "k2": "v2"}
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="creds"),
                             string_data={"password": "hunter2"})
    core.create_namespaced_secret(namespace, secret)
    s = core.read_namespaced_secret("creds", namespace)
    assert base64.b64decode(s.data["password"]) == b"hunter2" and s.type == "Opaque"
    pvc = client.V1PersistentVolumeClaim(
        metadata=client.V1ObjectMeta(name="disk"),
        spec=client.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"],
            resources=client.V1VolumeResourceRequirements(requests={"storage": "1Gi"})))
    core.create_namespaced_persistent_volume_claim(namespace, pvc)
    assert core.read_namespaced_persistent_volume_claim("disk", namespace).status.phase \
        == "Pending"
    names = [n.metadata.name for n in core.list_namespace().items]
    assert "default" in names and namespace in names
    core.delete_namespaced_config_map("settings", namespace)
    assert [c.metadata.name for c in core.list_namespaced_config_map(namespace).items] == []


def test_watch_stream(api: client.ApiClient, namespace: str) -> None:
    co = client.CustomObjectsApi(api)
    start = co.list_namespaced_custom_object(G, V, namespace, "virtualmachines")
    rv = start["metadata"]["resourceVersion"]
    seen: list[tuple[str, str]] = []

    def watcher() -> None:
        w = watch.Watch()
        for ev in w.stream(co.list_namespaced_custom_object, G, V, namespace,
                           "virtualmachines", resource_version=rv, timeout_seconds=20):
            seen.append((ev["type"], ev["object"]["metadata"]["name"]))
            if ev["type"] == "DELETED":
                w.stop()

    t = threading.Thread(target=watcher)
    t.start()
    co.create_namespaced_custom_object(G, V, namespace, "virtualmachines", _vm("w1"))
    co.patch_namespaced_custom_object(G, V, namespace, "virtualmachines", "w1",
                                      {"spec": {"runStrategy": "Always"}})
    co.delete_namespaced_custom_object(G, V, namespace, "virtualmachines", "w1")
    t.join(30)
    assert not t.is_alive()
    # The VM controller's own writes (finalizer, status) arrive as further MODIFIED events.
    collapsed = [e for i, e in enumerate(seen) if i == 0 or seen[i - 1] != e]
    assert collapsed == [("ADDED", "w1"), ("MODIFIED", "w1"), ("DELETED", "w1")], seen


def test_stale_update_is_409(api: client.ApiClient, namespace: str) -> None:
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object(G, V, namespace, "virtualmachines", _vm("c"))
    vm = _settled(co, namespace, "c")
    first = copy.deepcopy(vm)
    vm["spec"]["runStrategy"] = "Manual"
    co.replace_namespaced_custom_object(G, V, namespace, "virtualmachines", "c", vm)
    first["spec"]["runStrategy"] = "Always"
    with pytest.raises(ApiException) as e:
        co.replace_namespaced_custom_object(G, V, namespace, "virtualmachines", "c", first)
    assert e.value.status == 409
    assert '"reason":"Conflict"' in e.value.body.replace(" ", "")
    assert co.get_namespaced_custom_object(G, V, namespace, "virtualmachines", "c")["spec"][
        "runStrategy"] == "Manual"


def test_invalid_object_is_422_with_field_paths(api: client.ApiClient, namespace: str) -> None:
    co = client.CustomObjectsApi(api)
    vm = _vm("bad")
    vm["spec"]["running"] = True
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(G, V, namespace, "virtualmachines", vm)
    assert e.value.status == 422
    assert "spec.running" in e.value.body
    vm = _vm("Bad_Name")
    with pytest.raises(ApiException) as e:
        co.create_namespaced_custom_object(G, V, namespace, "virtualmachines", vm)
    assert e.value.status == 422 and "metadata.name" in e.value.body


def test_compacted_resource_version_is_410(tmp_path: Path) -> None:
    p = PlatformProcess(tmp_path / "compact",
                        env={"VIRTSHIFT_STORE_HISTORY": "20",
                             "VIRTSHIFT_COMPACT_INTERVAL": "0.2"}).start()
    try:
        with _api_client(p.kubeconfig) as c:
            core = client.CoreV1Api(c)
            first = core.create_namespaced_config_map(
                "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm0")))
            old_rv = first.metadata.resource_version
            for i in range(1, 60):
                core.patch_namespaced_config_map("cm0", "default", {"data": {"i": str(i)}})
            deadline = time.monotonic() + 20
            status = 0
            while time.monotonic() < deadline and status != 410:
                try:
                    for _ in watch.Watch().stream(core.list_namespaced_config_map, "default",
                                                  resource_version=old_rv, timeout_seconds=2):
                        pass
                except ApiException as e:
                    status = e.status
            assert status == 410
    finally:
        p.stop()


def test_dry_run_delete_in_delete_options(api: client.ApiClient, namespace: str) -> None:
    """The client sends dryRun inside DeleteOptions (the body): nothing may be deleted."""
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="keep-me"), data={"k": "v"}))
    core.delete_namespaced_config_map("keep-me", namespace,
                                      body=client.V1DeleteOptions(dry_run=["All"]))
    assert core.read_namespaced_config_map("keep-me", namespace).data == {"k": "v"}
    with pytest.raises(ApiException) as bad:
        core.delete_namespaced_config_map("keep-me", namespace,
                                          body=client.V1DeleteOptions(dry_run=["Some"]))
    assert bad.value.status == 400
    core.delete_namespaced_config_map("keep-me", namespace)
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_config_map("keep-me", namespace)
    assert gone.value.status == 404
