"""The test guest built by `make setup` boots under bare QEMU (TCG) and does what DESIGN.md
promises: TESTGUEST-READY on the serial console, DHCP on eth0, a console shell, HTTP on :80, NoCloud
user-data, ACPI power-down. The images are required: when they are missing these tests fail (run
make setup).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from virtshift.testing.guest import GuestImages, TestGuest, http_get, make_nocloud_iso

USER_DATA = "#!/bin/sh\necho CLOUD-INIT-RAN-$(hostname)\n"


@pytest.fixture(scope="module")
def images() -> GuestImages:
    return GuestImages.locate()  # raises (the test fails) when the image was not built


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("boot", "machine", "cdrom"),
    [("kernel", None, False),   # -kernel vmlinuz -initrd initrd.img, i440fx, virtio-blk cidata
     ("disk", "q35", True)],    # SYSLINUX disk alone (overlay), q35, cidata on an AHCI cdrom
)
def test_guest_boots_and_serves(images: GuestImages, tmp_path: Path, boot: str,
                                machine: str | None, cdrom: bool) -> None:
    hostname = f"guest-{boot}"
    iso = make_nocloud_iso(tmp_path / "cidata.iso", USER_DATA, hostname=hostname)
    base_digest = _sha256(images.disk) if boot == "disk" else ""
    guest = TestGuest(tmp_path / "vm", boot="disk" if boot == "disk" else "kernel",
                      images=images, machine=machine, nocloud_iso=iso, cdrom_iso=cdrom)
    with guest:
        assert guest.console is not None
        ready = guest.wait_ready(timeout=60)
        print(f"{boot} boot: TESTGUEST-READY after {ready:.2f}s")
        text = guest.console.text
        # user-data ran before READY, with the hostname from meta-data, output on the console
        assert re.search(rf"^CLOUD-INIT-RAN-{hostname}$", text, re.M), text[-3000:]
        assert text.index(f"CLOUD-INIT-RAN-{hostname}") < text.index("TESTGUEST-READY")
        if boot == "disk":
            assert "SYSLINUX" in text  # booted by the disk's boot loader, not -kernel

        # the console shell answers
        assert guest.console.run("echo $((6*7))").strip() == "42"
        assert guest.console.run("hostname").strip() == hostname
        # DHCP from QEMU user networking applied an address
        assert "10.0.2.15/24" in guest.console.run("ip -4 addr show dev eth0")

        # HTTP through the hostfwd
        page = http_get(guest.url("/"), timeout=20)
        assert "virtshift testguest" in page
        assert hostname in page

        # ACPI power-down makes the guest power off and QEMU exit
        guest.powerdown()
        assert guest.wait_exit(timeout=30) == 0
    if boot == "disk":
        assert _sha256(images.disk) == base_digest, "the base qcow2 must never change"


def test_guest_agent_pvh_boot(images: GuestImages, tmp_path: Path) -> None:
    """PVH boot of vmlinux (fast path) without a datasource; qemu-ga answers on its virtio port."""
    if not images.vmlinux.is_file():
        pytest.fail(f"{images.vmlinux} missing: run make setup")
    guest = TestGuest(tmp_path / "vm", boot="pvh", images=images, guest_agent=True, hostfwd={})
    with guest:
        ready = guest.wait_ready(timeout=60)
        print(f"pvh boot: TESTGUEST-READY after {ready:.2f}s")
        assert guest.console is not None
        assert guest.console.run("hostname").strip() == "testguest"
        ga = guest.guest_agent_connection(timeout=30)
        try:
            assert ga.execute("guest-ping") == {}
            assert ga.execute("guest-get-host-name")["host-name"] == "testguest"
            osinfo = ga.execute("guest-get-osinfo")
            assert osinfo["kernel-release"].endswith("-amd64")
            assert osinfo["id"] == "virtshift-testguest"
        finally:
            ga.close()
        guest.powerdown()
        assert guest.wait_exit(timeout=30) == 0
