"""Kill -9 of the platform loses no acknowledged write; revisions and watches carry on."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client, config, watch

from virtshift.testing.platform import PlatformProcess

pytestmark = pytest.mark.e2e


def _core(kubeconfig: Path) -> tuple[client.ApiClient, client.CoreV1Api]:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    c = client.ApiClient(cfg)
    return c, client.CoreV1Api(c)


def test_kill_9_then_restart(tmp_path: Path) -> None:
    p = PlatformProcess(tmp_path / "data").start()
    acknowledged: dict[str, str] = {}
    try:
        c, core = _core(p.kubeconfig)
        with c:
            for i in range(40):
                cm = core.create_namespaced_config_map(
                    "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"cm{i}"),
                                                  data={"i": str(i)}))
                acknowledged[cm.metadata.name] = cm.metadata.resource_version
            last_rv = core.list_namespaced_config_map("default").metadata.resource_version
    finally:
        p.kill()

    p.start()
    try:
        c, core = _core(p.kubeconfig)
        with c:
            items = core.list_namespaced_config_map("default").items
            got = {i.metadata.name: i.metadata.resource_version for i in items}
            assert got == acknowledged
            assert {i.metadata.name: i.data["i"] for i in items} == {
                f"cm{i}": str(i) for i in range(40)}
            # A write after restart continues the revision sequence.
            after = core.patch_namespaced_config_map("cm0", "default", {"data": {"i": "new"}})
            assert int(after.metadata.resource_version) > int(last_rv)
            # A watch from a revision taken before the crash resumes and sees that write.
            events = []
            for ev in watch.Watch().stream(core.list_namespaced_config_map, "default",
                                           resource_version=last_rv, timeout_seconds=3):
                events.append((ev["type"], ev["object"].metadata.name,
                               ev["object"].data["i"]))
                break
            assert events == [("MODIFIED", "cm0", "new")]
    finally:
        p.stop()
