"""Fuzzing the HTTP API with hypothesis: bad input gets a Kubernetes Status (never a 500) and
changes nothing that is stored."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtshift.testing.platform import PlatformProcess

pytestmark = pytest.mark.e2e

# More examples on demand: VIRTSHIFT_FUZZ_EXAMPLES=2000 pytest tests/e2e/test_api_fuzz.py
FUZZ_EXAMPLES = int(os.environ.get("VIRTSHIFT_FUZZ_EXAMPLES", "80"))
ALLOWED = {400, 401, 403, 404, 405, 406, 409, 410, 413, 415, 422}
VM_URL = "/apis/kubevirt.io/v1/namespaces/default/virtualmachines"


class Api:
    def __init__(self, platform: PlatformProcess) -> None:
        cfg = platform.config()
        self.base = cfg.server
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {cfg.token}"
        self._ca = tempfile.NamedTemporaryFile(suffix=".crt")  # noqa: SIM115
        self._ca.write(cfg.ca_pem)
        self._ca.flush()
        self.session.verify = self._ca.name
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify

    def call(self, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json") -> requests.Response:
        return self.session.request(method, self.base + path, data=body,
                                    headers={"Content-Type": content_type}, timeout=30)

    def snapshot(self) -> list[tuple[str, str]]:
        out = []
        for url in (VM_URL, "/api/v1/namespaces/default/configmaps"):
            items = self.call("GET", url).json()["items"]
            out += [(i["metadata"]["name"], i["metadata"]["resourceVersion"]) for i in items]
        return sorted(out)


@pytest.fixture(scope="module")
def api(platform: PlatformProcess) -> Iterator[Api]:
    a = Api(platform)
    yield a
    a.session.close()


def _check_status(resp: requests.Response) -> dict[str, Any]:
    assert resp.status_code in ALLOWED, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["code"] == resp.status_code and body["reason"]
    return body  # type: ignore[no-any-return]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def _vm_like(draw_spec: Any, name: Any, api_version: Any, kind: Any) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name},
            "spec": draw_spec}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=200))
def test_random_bytes_are_rejected_cleanly(api: Api, body: bytes) -> None:
    before = api.snapshot()
    resp = api.call("POST", VM_URL, body)
    if resp.status_code < 300:  # a body that happens to be a valid VM is fine
        return
    _check_status(resp)
    assert api.snapshot() == before


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=json_values,
       name=st.one_of(st.text(max_size=70), st.none(), st.integers()),
       api_version=st.sampled_from(["kubevirt.io/v1", "v1", "kubevirt.io/v2", None, 7]),
       kind=st.sampled_from(["VirtualMachine", "VirtualMachineInstance", "", None]))
def test_random_objects_never_break_the_server(api: Api, spec: Any, name: Any,
                                               api_version: Any, kind: Any) -> None:
    before = api.snapshot()
    resp = api.call("POST", VM_URL, json.dumps(_vm_like(spec, name, api_version, kind)).encode())
    if resp.status_code == 201:
        created = resp.json()["metadata"]["name"]
        assert api.call("DELETE", f"{VM_URL}/{created}").status_code == 200
        return
    _check_status(resp)
    assert api.snapshot() == before


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(patch=json_values, ptype=st.sampled_from([
    "application/json-patch+json", "application/merge-patch+json",
    "application/strategic-merge-patch+json", "application/apply-patch+yaml", "text/plain"]))
def test_random_patches(api: Api, patch: Any, ptype: str) -> None:
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
          "metadata": {"name": "fuzz-target"},
          "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {"devices": {}}}}}}
    resp = api.call("POST", VM_URL, json.dumps(vm).encode())
    assert resp.status_code in (201, 409)
    before = settled(api, f"{VM_URL}/fuzz-target")
    path = f"{VM_URL}/fuzz-target?fieldManager=fuzz"
    resp = api.call("PATCH", path, json.dumps(patch).encode(), content_type=ptype)
    if resp.status_code >= 300:
        _check_status(resp)
        after = api.call("GET", f"{VM_URL}/fuzz-target").json()
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def settled(api: Api, url: str, timeout: float = 30.0) -> Any:
    """The object once the VM controller has written its status (and stopped writing)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        obj = api.call("GET", url).json()
        if (obj.get("status") or {}).get("printableStatus") == "Stopped" and last is not None \
                and last["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]:
            return obj
        last = obj
        time.sleep(0.05)
    raise AssertionError(f"{url} did not settle: {last}")


def test_specific_bad_requests(api: Api) -> None:
    cases = [
        ("POST", VM_URL, b"{not json", "application/json", 400),
        ("POST", VM_URL, b"a: [b", "application/yaml", 400),
        ("POST", VM_URL, b"{}", "application/json", 400),
        ("POST", VM_URL, json.dumps({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                     "metadata": {}}).encode(), "application/json", 422),
        ("POST", VM_URL, json.dumps({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                     "metadata": {"name": "UPPER"}}).encode(),
         "application/json", 422),
        ("POST", VM_URL, b"x" * (4 * 1024 * 1024), "application/json", 413),
        ("POST", VM_URL, b"<xml/>", "application/xml", 415),
        ("GET", "/apis/kubevirt.io/v1/namespaces/default/nothings", None, "application/json",
         404),
        ("GET", "/apis/nope.io/v1", None, "application/json", 404),
        ("GET", f"{VM_URL}/absent", None, "application/json", 404),
        ("PATCH", "/api/v1/namespaces/default", b"{}", "text/plain", 415),
        ("PATCH", f"{VM_URL}/absent", b"{}", "application/merge-patch+json", 404),
        ("GET", f"{VM_URL}?labelSelector=a%20in%20(", None, "application/json", 400),
        ("GET", f"{VM_URL}?fieldSelector=spec.foo%3Dx", None, "application/json", 400),
        ("GET", f"{VM_URL}?limit=x", None, "application/json", 400),
    ]
    before = api.snapshot()
    for method, path, body, ctype, code in cases:
        resp = api.call(method, path, body, ctype)
        assert resp.status_code == code, (method, path, ctype, resp.status_code, resp.text[:300])
        _check_status(resp)
    assert api.snapshot() == before


def test_warning_headers_survive_odd_field_names(api: Api) -> None:
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
          "metadata": {"name": "odd-fields"},
          "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {"devices": {}}}},
                   "\x1f\u00e9": 1}}
    resp = api.call("POST", VM_URL + "?fieldValidation=Warn", json.dumps(vm).encode())
    assert resp.status_code == 201, resp.text
    assert "unknown field" in resp.headers["Warning"]
    gone = api.call("DELETE", f"{VM_URL}/odd-fields")
    assert gone.status_code == 200, gone.text


def test_missing_token_is_401(platform: PlatformProcess) -> None:
    cfg = platform.config()
    with tempfile.NamedTemporaryFile(suffix=".crt") as ca:
        ca.write(cfg.ca_pem)
        ca.flush()
        resp = requests.get(cfg.server + VM_URL, verify=ca.name, timeout=10)
    assert resp.status_code == 401
    assert resp.json()["reason"] == "Unauthorized"
