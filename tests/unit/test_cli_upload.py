"""``virtshift image-upload``'s pure parts (arguments, sizes, URLs, manifests, readiness) and the
upload token's signing and checks."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from virtshift.api import cdi
from virtshift.apiserver.upload import (
    TokenError,
    agent_base,
    bearer,
    issue_token,
    token_ttl,
    upload_refusal,
    verify_token,
)
from virtshift.cli import main
from virtshift.cli.upload import (
    Options,
    ProgressBar,
    UploadCommandError,
    dv_manifest,
    dv_ready,
    existing_pvc_problem,
    options,
    parse_size,
    proxy_base,
    pvc_manifest,
    pvc_waits_for_consumer,
    status_message,
    upload_url,
)
from virtshift.errors import BadRequest, ServiceUnavailable


def opts(**kw: Any) -> Options:
    base: dict[str, Any] = {"image_path": "/tmp/disk.qcow2", "size": "1Gi"}
    base.update(kw)
    return options(kw.pop("resource", "dv"), "disk", "ns", **{k: v for k, v in base.items()
                                                              if k != "resource"})


# ---- arguments ---------------------------------------------------------------------------------


def test_size_parsing_is_kubernetes_quantities() -> None:
    assert parse_size("10Gi") == ("10Gi", 10 * 1024**3)
    assert parse_size("500M") == ("500M", 500 * 10**6)
    assert parse_size(" 64Mi ") == ("64Mi", 64 * 1024**2)
    assert parse_size("1073741824") == ("1073741824", 1024**3)
    for bad in ("10GB", "ten", "", "-1Gi", "0"):
        with pytest.raises(UploadCommandError, match=f"validation failed for size={bad}"):
            parse_size(bad)


def test_options_check_the_command_line_as_virtctl() -> None:
    o = opts(volume_mode="Block", access_mode="ReadWriteMany", size="2Gi")
    assert (o.kind, o.name, o.namespace, o.size) == ("dv", "disk", "ns", "2Gi")
    assert o.volume_mode == "Block" and o.access_mode == "ReadWriteMany"
    assert opts(resource="PVC", volume_mode="filesystem").volume_mode == "Filesystem"
    assert opts(size=None).size == ""  # only needed when creating
    with pytest.raises(UploadCommandError, match="invalid resource type vm"):
        opts(resource="vm")
    with pytest.raises(UploadCommandError, match="Invalid volume mode 'disk'"):
        opts(volume_mode="disk")
    with pytest.raises(UploadCommandError, match="cannot upload to a readonly volume"):
        opts(access_mode="ReadOnlyMany")
    with pytest.raises(UploadCommandError, match="invalid access mode RWO"):
        opts(access_mode="RWO")
    with pytest.raises(UploadCommandError, match="--image-path must be provided"):
        opts(image_path=None)
    with pytest.raises(UploadCommandError, match="--wait-secs"):
        opts(wait_secs=-1)


def test_the_verb_is_registered_with_virtctls_flags() -> None:
    args = main.parser().parse_args([
        "image-upload", "dv", "fedora", "--size=10Gi", "--image-path", "/x.qcow2", "--insecure",
        "--uploadproxy-url", "proxy:8443", "--storage-class", "sc", "--access-mode",
        "ReadWriteOnce", "--volume-mode", "filesystem", "--force-bind", "--no-create",
        "--wait-secs", "5", "-n", "vms"])
    assert (args.resource, args.name, args.size, args.image_path) == (
        "dv", "fedora", "10Gi", "/x.qcow2")
    assert args.insecure and args.force_bind and args.no_create and args.wait_secs == 5
    assert (args.uploadproxy_url, args.storage_class, args.namespace) == ("proxy:8443", "sc",
                                                                          "vms")


def test_bad_arguments_fail_before_touching_the_cluster(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    missing = tmp_path / "kubeconfig-that-does-not-exist"
    with pytest.raises(SystemExit) as e:
        main.run(["--kubeconfig", str(missing), "image-upload", "dv", "d", "--size", "lots",
                  "--image-path", "/x"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: validation failed for size=lots") and "\n" not in err


# ---- URLs --------------------------------------------------------------------------------------


def test_proxy_url_flag_then_cdiconfig_then_api_server() -> None:
    server = "https://127.0.0.1:6443"
    assert proxy_base("", None, server) == server
    assert proxy_base("proxy.example:443", None, server) == "https://proxy.example:443"
    assert proxy_base("http://p", None, server) == "http://p"
    config = {"spec": {}, "status": {"uploadProxyURL": "cdi-uploadproxy.example"}}
    assert proxy_base("", config, server) == "https://cdi-uploadproxy.example"
    config["spec"] = {"uploadProxyURLOverride": "https://override:8443"}
    assert proxy_base("", config, server) == "https://override:8443"
    assert proxy_base("https://flag", config, server) == "https://flag"


def test_upload_url_appends_the_path_once() -> None:
    assert upload_url("https://h:6443", "/v1beta1/upload-async") == \
        "https://h:6443/v1beta1/upload-async"
    assert upload_url("https://h/prefix/", "/v1beta1/upload") == "https://h/prefix/v1beta1/upload"
    assert upload_url("https://h/v1beta1/upload", "/v1beta1/upload") == \
        "https://h/v1beta1/upload"


# ---- manifests and readiness -------------------------------------------------------------------


def test_datavolume_and_claim_manifests() -> None:
    dv = dv_manifest(opts(storage_class="fast", force_bind=True))
    assert dv["spec"]["source"] == {"upload": {}}
    assert dv["spec"]["storage"] == {"resources": {"requests": {"storage": "1Gi"}},
                                     "storageClassName": "fast"}
    assert dv["metadata"]["annotations"] == {cdi.ANN_BIND_IMMEDIATE: "true"}
    assert "annotations" not in dv_manifest(opts())["metadata"]
    pvc = pvc_manifest(opts(resource="pvc", volume_mode="block"))
    ann = pvc["metadata"]["annotations"]
    assert ann[cdi.ANN_UPLOAD_TARGET] == ""
    assert cdi.populate_source(pvc) == cdi.PopulateSource(type="upload")
    assert cdi.ANN_BIND_IMMEDIATE not in ann
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["volumeMode"] == "Block"


def test_existing_claims_are_checked() -> None:
    target = pvc_manifest(opts(resource="pvc"))
    assert existing_pvc_problem(target, opts()) is None
    plain: dict[str, Any] = {"metadata": {"name": "disk"}}
    assert existing_pvc_problem(plain, opts()) == "PVC disk not available for upload"
    assert existing_pvc_problem(plain, opts(no_create=True)) is None  # it will be annotated
    done = {"metadata": {"annotations": {**target["metadata"]["annotations"],
                                         cdi.ANN_POD_PHASE: cdi.POD_SUCCEEDED}}}
    assert existing_pvc_problem(done, opts()) == \
        "PVC disk already successfully imported/cloned/updated"


def test_datavolume_readiness_and_the_wffc_refusal() -> None:
    def dv(phase: str) -> dict[str, Any]:
        return {"metadata": {"name": "d"}, "status": {"phase": phase}}

    assert dv_ready(dv("UploadReady"), False) is True
    assert dv_ready(dv("UploadScheduled"), False) is False
    assert dv_ready(dv(""), False) is False
    assert dv_ready(dv("WaitForFirstConsumer"), True) is False  # waits for the forced binding
    with pytest.raises(UploadCommandError, match="cannot upload to DataVolume in "
                       "WaitForFirstConsumer phase, make sure the PVC is Bound, or use "
                       "force-bind flag"):
        dv_ready(dv("WaitForFirstConsumer"), False)
    with pytest.raises(UploadCommandError, match="PendingPopulation phase"):
        dv_ready(dv("PendingPopulation"), False)
    with pytest.raises(UploadCommandError, match="already succeeded"):
        dv_ready(dv("Succeeded"), False)


def test_claim_waiting_for_its_first_consumer() -> None:
    wffc = {"metadata": {"name": "hpp", "annotations": {
        "storageclass.kubernetes.io/is-default-class": "true"}},
        "volumeBindingMode": "WaitForFirstConsumer"}
    immediate = {"metadata": {"name": "fast"}, "volumeBindingMode": "Immediate"}
    pending: dict[str, Any] = {"metadata": {}, "spec": {}, "status": {"phase": "Pending"}}
    assert pvc_waits_for_consumer(pending, [immediate, wffc]) is True  # the default class
    assert pvc_waits_for_consumer({**pending, "spec": {"storageClassName": "fast"}},
                                  [immediate, wffc]) is False
    forced = {**pending, "metadata": {"annotations": {cdi.ANN_BIND_IMMEDIATE: "true"}}}
    assert pvc_waits_for_consumer(forced, [wffc]) is False
    assert pvc_waits_for_consumer({**pending, "status": {"phase": "Bound"}}, [wffc]) is False


def test_status_message_is_one_line() -> None:
    body = json.dumps({"kind": "Status", "message": "upload into PVC d failed:\nnot a disk"})
    assert status_message(400, body.encode()) == \
        "unexpected return value 400, upload into PVC d failed: not a disk"
    assert status_message(503, b"") == "unexpected return value 503, no message"


def test_progress_bar_shows_bytes_total_and_rate() -> None:
    out = io.StringIO()
    bar = ProgressBar(4 * 1024 * 1024, out, tty=False)
    for _ in range(4):
        bar.update(1024 * 1024)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # one a quarter off a terminal
    assert lines[-1].startswith("[" + "#" * ProgressBar.WIDTH + "] 100% 4.0MiB / 4.0MiB ")
    assert lines[-1].endswith("/s")
    tty = io.StringIO()
    bar = ProgressBar(100, tty, tty=True)
    bar.update(50)
    bar.finish()
    assert tty.getvalue().startswith("\r[") and " 50% 50B / 100B " in tty.getvalue()


# ---- tokens ------------------------------------------------------------------------------------


def test_tokens_bind_namespace_and_claim_and_expire() -> None:
    key = b"k" * 32
    token = issue_token(key, "ns", "disk", now=1000.0, ttl=300)
    claim = verify_token(key, token, now=1299.0)
    assert (claim.namespace, claim.pvc, claim.expires) == ("ns", "disk", 1300)
    with pytest.raises(TokenError, match="expired"):
        verify_token(key, token, now=1300.0)
    with pytest.raises(TokenError, match="invalid"):
        verify_token(b"other" * 8, token, now=1000.0)
    head, payload, sig = token.split(".")
    other = issue_token(key, "ns", "other", now=1000.0).split(".")[1]
    with pytest.raises(TokenError, match="invalid"):
        verify_token(key, f"{head}.{other}.{sig}", now=1000.0)  # a payload swapped in
    for bad in ("", "garbage", "v1.x.y", "v2." + payload + "." + sig, token + "."):
        with pytest.raises(TokenError):
            verify_token(key, bad, now=1000.0)
    assert TokenError("x").code == 401


def test_bearer_header_and_ttl_setting() -> None:
    assert bearer("Bearer abc.def-_") == "abc.def-_"
    assert bearer("bearer   xyz") == "xyz"
    assert bearer("Basic abc") is None and bearer("Bearer") is None
    assert token_ttl({}) == 300 and token_ttl({"VIRTSHIFT_UPLOAD_TOKEN_TTL": "7"}) == 7
    assert token_ttl({"VIRTSHIFT_UPLOAD_TOKEN_TTL": "soon"}) == 300


def test_proxy_refusals_and_agent_address() -> None:
    target = pvc_manifest(opts(resource="pvc"))
    target["metadata"]["annotations"][cdi.ANN_POD_READY] = "true"
    assert isinstance(upload_refusal(target, "disk"), ServiceUnavailable)  # not bound
    target["status"] = {"phase": "Bound"}
    assert upload_refusal(target, "disk") is None
    target["metadata"]["annotations"][cdi.ANN_POD_READY] = "false"
    assert isinstance(upload_refusal(target, "disk"), ServiceUnavailable)
    target["metadata"]["annotations"][cdi.ANN_POD_PHASE] = cdi.POD_SUCCEEDED
    refusal = upload_refusal(target, "disk")
    assert isinstance(refusal, BadRequest) and "already finished uploading" in refusal.message
    refusal = upload_refusal({"metadata": {}, "status": {"phase": "Bound"}}, "disk")
    assert isinstance(refusal, BadRequest) and refusal.message == \
        "PVC disk is not an upload target"
    node = {"status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                     {"type": "InternalIP", "address": "10.0.0.5"}],
                       "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}}
    assert agent_base(node) == "https://10.0.0.5:10250"
    assert agent_base({"status": {}}) is None
