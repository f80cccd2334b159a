#!/usr/bin/env bash
# Installs the system packages virtshift needs (Debian). Idempotent: does nothing when all are present.
set -euo pipefail
packages=(
  sqlite3 iproute2 procps
  # QEMU and firmware (UEFI: ovmf)
  qemu-system-x86 qemu-utils ovmf
  # test guest builder (scripts/build-guest.sh): busybox initramfs + SYSLINUX bootable disk
  busybox-static kmod cpio xz-utils gzip syslinux syslinux-common extlinux mtools dosfstools fdisk
  # cloud-init NoCloud / ConfigDrive ISOs
  genisoimage
  # storage: loop devices for Block volumes (losetup); bench/clone.py --xfs and
  # bench/import_http.py's baselines (mkfs.xfs with reflink, curl)
  util-linux xfsprogs curl
  # bench/api_store.py's HTTP load generator
  wrk
  # scripts/build-native.py: mypyc compiles the API server's hot modules to C extensions
  gcc python3-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi
