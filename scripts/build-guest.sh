#!/usr/bin/env bash
# Builds the virtshift test guest from Debian packages into .cache/guest/ (see DESIGN.md, "Test guest"):
#   vmlinuz          Debian kernel (bzImage), for -kernel boot
#   vmlinux          the same kernel as an uncompressed ELF (faster PVH boot with -kernel)
#   initrd.img       busybox initramfs: modules, DHCP, acpid, httpd :80, NoCloud/ConfigDrive user-data,
#                    qemu-ga on org.qemu.guest_agent.0, TESTGUEST-READY, a root shell on the console
#   testguest.qcow2  MBR + FAT16 + SYSLINUX disk holding vmlinuz and initrd.img; boots without -kernel
# The kernel and qemu-guest-agent packages are fetched with `apt-get download` into .cache/guest/debs
# and unpacked with dpkg -x: nothing is installed system-wide. The build is cached: it reruns only
# when this script or a package version changes (stamp file). Needs root-free tools only, except
# mknod for /dev/console in the initramfs (run as root, which `make setup` is).
# Options: --force (rebuild even when up to date). VIRTSHIFT_GUEST_DIR overrides the output dir.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin" LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/scripts/$(basename "${BASH_SOURCE[0]}")"
OUT=${VIRTSHIFT_GUEST_DIR:-$REPO/.cache/guest}
DEBS=$OUT/debs
WORK=$OUT/.work
DISK_MIB=64
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { printf '[build-guest %3ds] %s\n' "$SECONDS" "$*"; }
die() { printf '[build-guest] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg dpkg-deb depmod modprobe cpio gzip xz sfdisk mkfs.vfat mcopy \
            syslinux qemu-img busybox ldd flock sha256sum; do
  command -v "$tool" >/dev/null || die "missing tool '$tool': run scripts/setup-system.sh first"
done
BUSYBOX=$(command -v busybox)
[[ -f /usr/lib/syslinux/mbr/mbr.bin ]] || die "missing /usr/lib/syslinux/mbr/mbr.bin (package syslinux-common)"

mkdir -p "$OUT" "$DEBS"
exec 9>"$OUT/.lock"
flock 9   # one build at a time

# ---------------------------------------------------------------- inputs and the cache stamp
resolve_kernel() {
  apt-cache depends --important linux-image-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
candidate_version() {
  apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'
}
outputs=(vmlinuz vmlinux initrd.img testguest.qcow2)
have_outputs() { local f; for f in "${outputs[@]}"; do [[ -s "$OUT/$f" ]] || return 1; done; }

KPKG=$(resolve_kernel)
if [[ -z "$KPKG" ]]; then
  log "apt lists do not know linux-image-amd64; running apt-get update"
  apt-get update -qq || true
  KPKG=$(resolve_kernel)
fi
if [[ -z "$KPKG" ]]; then
  if have_outputs; then
    log "WARNING: cannot resolve the kernel package (offline?); keeping the existing guest build"
    exit 0
  fi
  die "cannot resolve linux-image-amd64 to a kernel package (apt-get update failed?)"
fi
KVER=${KPKG#linux-image-}
KDEBVER=$(candidate_version "$KPKG")
QGAVER=$(candidate_version qemu-guest-agent)
BBVER=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || "$BUSYBOX" | head -1)
SLVER=$(dpkg-query -W -f='${Version}' syslinux 2>/dev/null || echo unknown)
[[ -n "$KDEBVER" && "$KDEBVER" != "(none)" ]] || die "no candidate version for $KPKG"
[[ -n "$QGAVER" && "$QGAVER" != "(none)" ]] || die "no candidate version for qemu-guest-agent"

STAMP_TEXT="script=$(sha256sum "$SELF" | cut -d' ' -f1)
kernel=$KPKG=$KDEBVER
busybox=$BBVER
qemu-guest-agent=$QGAVER
syslinux=$SLVER"
if [[ $FORCE == 0 ]] && have_outputs && [[ -f "$OUT/stamp" ]] \
   && [[ "$(cat "$OUT/stamp")" == "$STAMP_TEXT" ]]; then
  log "test guest is up to date in $OUT ($KPKG $KDEBVER)"
  exit 0
fi
log "building the test guest into $OUT"
log "  kernel $KPKG $KDEBVER, busybox $BBVER, qemu-guest-agent $QGAVER, syslinux $SLVER"

rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- fetch packages (cached)
fetch_deb() {  # fetch_deb PACKAGE VERSION -> prints the .deb path
  local pkg=$1 ver=$2 dir="$DEBS/$1"
  local want="$dir/${pkg}_${ver//:/%3a}_amd64.deb"
  if [[ ! -s "$want" ]]; then
    log "downloading $pkg $ver" >&2
    mkdir -p "$dir"
    rm -f "$dir"/*.deb
    if ! (cd "$dir" && apt-get -q -o APT::Sandbox::User=root download "$pkg=$ver" >&2); then
      log "download failed; refreshing apt lists and retrying" >&2
      apt-get update -qq >&2 || true
      (cd "$dir" && apt-get -q -o APT::Sandbox::User=root download "$pkg=$ver" >&2)
    fi
    [[ -s "$want" ]] || want=$(ls "$dir"/*.deb | head -1)
  fi
  [[ -s "$want" ]] || die "no .deb for $pkg"
  echo "$want"
}
KDEB=$(fetch_deb "$KPKG" "$KDEBVER")
QGADEB=$(fetch_deb qemu-guest-agent "$QGAVER")
# keep only what this build uses
find "$DEBS" -mindepth 1 -maxdepth 1 -type d ! -name "$KPKG" ! -name qemu-guest-agent \
  -exec rm -rf {} +

# ---------------------------------------------------------------- kernel and modules
log "unpacking $(basename "$KDEB")"
dpkg -x "$KDEB" "$WORK/kernel"
[[ -f "$WORK/kernel/boot/vmlinuz-$KVER" ]] || die "kernel package has no boot/vmlinuz-$KVER"
depmod -b "$WORK/kernel" "$KVER"

# Three groups of top-level modules; modprobe --show-depends orders each group's dependencies
# (virtio_ring before virtio, ...). /init loads "core" first, "storage" in the background while
# DHCP runs (AHCI link probing takes ~0.3 s under TCG), and "late" after TESTGUEST-READY; the
# kernel also autoloads on demand (e.g. mount -t ext4) through busybox modprobe and modules.dep.
# CPU-accelerated crypto (arch/x86/crypto, soft dependencies) is left out: it fails under TCG.
MODULES_CORE=(
  virtio_pci virtio_mmio virtio_net virtio_blk virtio_console virtio-rng virtio_balloon
  virtio_input e1000 e1000e button evdev isofs vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859_1
)
MODULES_STORAGE=(virtio_scsi ahci ata_piix sd_mod sr_mod)
MODULES_LATE=(crc32c_generic ext4 loop virtiofs vmw_vsock_virtio_transport)
ROOT="$WORK/root"
mkdir -p "$ROOT/lib/modules/$KVER" "$ROOT/etc/testguest"
kmods="$WORK/kernel/lib/modules/$KVER/"
: > "$WORK/modules.seen"
module_group() {  # module_group NAME MODULE... -> /etc/testguest/modules.NAME (paths, in order)
  local group=$1 path rel
  shift
  : > "$ROOT/etc/testguest/modules.$group"
  modprobe -d "$WORK/kernel" -S "$KVER" --show-depends -a "$@" \
    | awk '$1 == "insmod" && $2 !~ /\/arch\/x86\/crypto\// {print $2}' \
    | while read -r path; do
        grep -qxF "$path" "$WORK/modules.seen" && continue
        echo "$path" >> "$WORK/modules.seen"
        rel=${path#"$kmods"}
        [[ "$rel" != "$path" ]] || die "unexpected module path $path"
        mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$rel")"
        cp "$path" "$ROOT/lib/modules/$KVER/$rel"
        echo "$rel" >> "$ROOT/etc/testguest/modules.$group"
      done
}
module_group core "${MODULES_CORE[@]}"
module_group storage "${MODULES_STORAGE[@]}"
module_group late "${MODULES_LATE[@]}"
cp "$kmods"/modules.order "$kmods"/modules.builtin* "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$ROOT" "$KVER"   # modules.dep/alias: `modprobe` and kernel autoloading in the guest
log "  $(wc -l < "$WORK/modules.seen") kernel modules"

# ---------------------------------------------------------------- initramfs tree
log "assembling the initramfs"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,dev,proc,sys,run,tmp,root,mnt,var/log,var/www}
mkdir -p "$ROOT"/etc/{udhcpc,acpi/PWRF,qemu}
ln -s ../run "$ROOT/var/run"
chmod 1777 "$ROOT/tmp"
chmod 700 "$ROOT/root"
cp "$BUSYBOX" "$ROOT/bin/busybox"
"$BUSYBOX" --list-full | while read -r applet; do
  case "$applet" in
    linuxrc|sbin/init) continue ;;
  esac
  [[ -e "$ROOT/$applet" ]] || ln -s /bin/busybox "$ROOT/$applet"
done
# /dev/console must exist before devtmpfs is mounted: the kernel opens it for init's stdio.
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3

# PID 1 (/init) traps the signals busybox poweroff/reboot/halt send to init (USR2/TERM/USR1).
# qemu-ga's guest-shutdown runs `/sbin/shutdown -h|-r -P|-H +0 MESSAGE`.
cat > "$ROOT/sbin/shutdown" <<'EOF'
#!/bin/sh
action=poweroff
for a in "$@"; do
  case "$a" in -r) action=reboot ;; -H) action=halt ;; esac
done
echo "testguest: shutdown $* -> $action" > /dev/console
exec /bin/busybox $action
EOF
chmod 755 "$ROOT/sbin/shutdown"

cat > "$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat > "$ROOT/etc/group" <<'EOF'
root:x:0:
tty:x:5:
nogroup:x:65534:
EOF
echo 'root::0:0:99999:7:::' > "$ROOT/etc/shadow"
chmod 600 "$ROOT/etc/shadow"
printf '/bin/sh\n/bin/ash\n' > "$ROOT/etc/shells"
echo testguest > "$ROOT/etc/hostname"
cat > "$ROOT/etc/os-release" <<EOF
PRETTY_NAME="virtshift testguest (Debian kernel $KVER, BusyBox)"
NAME="virtshift testguest"
ID=virtshift-testguest
ID_LIKE=debian
VERSION_ID="1"
EOF
cat > "$ROOT/etc/profile" <<'EOF'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=${TERM:-vt100}
PS1='\h:\w\$ '
EOF
echo 'nameserver 10.0.2.3' > "$ROOT/etc/resolv.conf"

cat > "$ROOT/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
# busybox udhcpc event script: apply the lease (its default path in Debian's busybox).
[ -n "$1" ] || exit 1
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    if [ -n "$router" ]; then
      while ip route del default dev "$interface" 2>/dev/null; do :; done
      for r in $router; do ip route add default via "$r" dev "$interface" && break; done
    fi
    if [ -n "$dns" ]; then
      : > /etc/resolv.conf
      [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
      for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    fi
    echo "$ip/${mask:-24}" > "/run/testguest/$interface.addr"
    ;;
esac
exit 0
EOF
chmod 755 "$ROOT/etc/udhcpc/default.script"

# acpid maps the ACPI power button (QMP system_powerdown) to PWRF/00000080.
cat > "$ROOT/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo "testguest: ACPI power button: powering off" > /dev/console
sync
exec /bin/busybox poweroff -f
EOF
chmod 755 "$ROOT/etc/acpi/PWRF/00000080"

# ---------------------------------------------------------------- qemu-guest-agent
log "adding qemu-ga from $(basename "$QGADEB")"
dpkg -x "$QGADEB" "$WORK/qga"
install -m 755 "$WORK/qga/usr/sbin/qemu-ga" "$ROOT/usr/sbin/qemu-ga"
ldd "$WORK/qga/usr/sbin/qemu-ga" > "$WORK/qga.ldd" || die "ldd qemu-ga failed"
if grep -q 'not found' "$WORK/qga.ldd"; then
  cat "$WORK/qga.ldd" >&2
  die "qemu-ga needs shared libraries missing on this host (install qemu-system-x86)"
fi
awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' "$WORK/qga.ldd" | sort -u \
  | while read -r lib; do
      mkdir -p "$ROOT/$(dirname "$lib")"
      cp -L "$lib" "$ROOT/$lib"
    done

# ---------------------------------------------------------------- /init
cat > "$ROOT/init" <<'EOF'
#!/bin/sh
# virtshift test guest: PID 1. Built by scripts/build-guest.sh in the virtshift repository.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=vt100
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs -o mode=0755 devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /run/testguest /run/cloud-init /dev/virtio-ports
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
umask 022
hostname -F /etc/hostname

say() { echo "testguest: $*"; }
cmdline_opt() {  # cmdline_opt NAME -> value of testguest.NAME=VALUE on the kernel command line
  for w in $(cat /proc/cmdline); do
    case "$w" in "testguest.$1="*) echo "${w#*=}"; return 0 ;; esac
  done
  return 1
}
load_modules() {  # load_modules GROUP: /etc/testguest/modules.GROUP, in dependency order
  while read -r m; do
    insmod "/lib/modules/$kver/$m" 2>>/run/testguest/modules.log || true
  done < "/etc/testguest/modules.$1"
}
kver=$(uname -r)
# busybox poweroff/reboot/halt signal init (USR2/TERM/USR1) instead of acting themselves; trap
# them from the start, so a user-data `poweroff` works too (it runs once user-data returns).
trap 'sync; exec /bin/busybox poweroff -f' USR2
trap 'sync; exec /bin/busybox reboot -f' TERM
trap 'sync; exec /bin/busybox halt -f' USR1

# 1. drivers: virtio, NICs, ACPI button, filesystems; storage controllers in the background
load_modules core
load_modules storage &
storage_pid=$!
acpid -c /etc/acpi -l /var/log/acpid.log   # ACPI power button (QMP system_powerdown) -> poweroff

# 2. network: lo, then DHCP (or testguest.ip=ADDR/PREFIX[,GATEWAY] for eth0) on every ethN
ip link set lo up
static=$(cmdline_opt ip) || static=
for dev in /sys/class/net/eth*; do
  [ -e "$dev" ] || continue
  i=${dev##*/}
  ip link set "$i" up
  if [ "$i" = eth0 ] && [ -n "$static" ]; then
    ip addr add "${static%%,*}" dev eth0
    case "$static" in *,*) ip route add default via "${static#*,}" dev eth0 ;; esac
    echo "${static%%,*}" > /run/testguest/eth0.addr
  elif [ "$(cmdline_opt dhcp)" != 0 ]; then
    # foreground until a lease (or 5 tries), then udhcpc stays in the background for renewals
    udhcpc -i "$i" -t 5 -T 1 -A 5 -b -p "/run/udhcpc.$i.pid" -x "hostname:$(hostname)" \
      -s /etc/udhcpc/default.script >"/run/testguest/udhcpc.$i.log" 2>&1
  fi
  say "$i $(cat "/run/testguest/$i.addr" 2>/dev/null || echo no-address)"
done
wait "$storage_pid"

# 3. cloud-init datasource: NoCloud (label cidata/CIDATA) or ConfigDrive (config-2)
set_hostname() {
  [ -n "$1" ] || return 0
  h=$(echo "$1" | tr -d '\r' | cut -c1-63)
  hostname "$h" && echo "$h" > /etc/hostname
}
ds_dev= ; ds_label=
for l in cidata CIDATA config-2 CONFIG-2; do
  d=$(findfs "LABEL=$l" 2>/dev/null) && { ds_dev=$d; ds_label=$l; break; }
done
ud=
if [ -n "$ds_dev" ]; then
  mkdir -p /run/cloud-init/ds
  if mount -o ro "$ds_dev" /run/cloud-init/ds 2>/dev/null; then
    case "$ds_label" in
      cidata|CIDATA)
        say "NoCloud datasource on $ds_dev"
        for f in meta-data user-data vendor-data network-config; do
          [ -f "/run/cloud-init/ds/$f" ] && cp "/run/cloud-init/ds/$f" "/run/cloud-init/$f"
        done
        [ -f /run/cloud-init/meta-data ] && set_hostname "$(sed -n \
          's/^[[:space:]]*local-hostname:[[:space:]]*["'\'']\{0,1\}\([^"'\'' ]*\).*/\1/p' \
          /run/cloud-init/meta-data | head -n1)"
        ;;
      *)
        say "ConfigDrive datasource on $ds_dev"
        base=/run/cloud-init/ds/openstack/latest
        [ -f "$base/meta_data.json" ] && cp "$base/meta_data.json" /run/cloud-init/meta_data.json
        [ -f "$base/user_data" ] && cp "$base/user_data" /run/cloud-init/user-data
        [ -f /run/cloud-init/meta_data.json ] && set_hostname "$(sed -n \
          's/.*"hostname"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' \
          /run/cloud-init/meta_data.json | head -n1)"
        ;;
    esac
    ud=/run/cloud-init/user-data
    umount /run/cloud-init/ds
  else
    say "cannot mount the datasource $ds_dev"
  fi
fi
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$(hostname)" > /etc/hosts

# 4. services: httpd on :80; qemu-ga once its virtio port shows up
write_page() {
  cat > /var/www/index.html <<PAGE
<!DOCTYPE html>
<html><head><title>virtshift testguest $(hostname)</title></head>
<body><h1>virtshift testguest</h1><p>hostname: $(hostname)</p></body></html>
PAGE
}
write_page
httpd -p 80 -h /var/www
(
  # the host names the ports shortly after virtio_console binds; link them like udev does
  n=0
  while [ $n -lt 50 ]; do
    for p in /sys/class/virtio-ports/vport*; do
      [ -r "$p/name" ] || continue
      name=$(cat "$p/name")
      [ -n "$name" ] && [ ! -e "/dev/virtio-ports/$name" ] && ln -s "../${p##*/}" "/dev/virtio-ports/$name"
    done
    if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
      qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -d \
        -f /run/qemu-ga.pid -t /run -l /var/log/qemu-ga.log && say "qemu-ga started"
      break
    fi
    ls /sys/bus/virtio/drivers/virtio_console/virtio* >/dev/null 2>&1 || break
    n=$((n + 1))
    usleep 100000
  done
) &

# 5. user-data: a #! script runs with /bin/sh, its output on the console
if [ -n "$ud" ] && [ -s "$ud" ]; then
  if [ "$(head -c 2 "$ud")" = '#!' ]; then
    say "running user-data"
    (cd / && /bin/sh "$ud" </dev/null)
    say "user-data exited with status $?"
  else
    say "user-data is not a #! script; ignored ($(head -n1 "$ud" | cut -c1-40))"
  fi
fi
write_page

say "up: hostname=$(hostname) uptime=$(cut -d' ' -f1 /proc/uptime)s"
echo TESTGUEST-READY
load_modules late &

# 6. a root shell on the console, forever. PID 1 only waits, so that it runs its traps at once.
(
  while :; do
    setsid cttyhack sh -l </dev/console >/dev/console 2>&1
    sleep 1
  done
) &
while :; do
  wait
done
EOF
chmod 755 "$ROOT/init"

log "packing initrd.img"
(cd "$ROOT" && find . -mindepth 1 -print0 | sort -z \
  | cpio --null -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n > "$WORK/initrd.img"

# ---------------------------------------------------------------- kernel images
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
log "extracting vmlinux from the bzImage"
# The bzImage payload is one XZ stream: find its magic (FD 37 7A 58 5A 00) and decompress it.
vmlinux_ok=0
for off in $(grep -obUaP '\xfd7zXZ\x00' "$WORK/vmlinuz" | cut -d: -f1); do
  # (process substitution: tail gets SIGPIPE when xz stops at the end of the stream)
  if xz -dc --single-stream < <(tail -c +"$((off + 1))" "$WORK/vmlinuz") > "$WORK/vmlinux" 2>/dev/null \
     && [[ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]]; then
    vmlinux_ok=1
    break
  fi
done
[[ $vmlinux_ok == 1 ]] || die "could not extract vmlinux from vmlinuz-$KVER"

# ---------------------------------------------------------------- bootable disk (no mounts)
log "building testguest.qcow2 (MBR + FAT16 + SYSLINUX, ${DISK_MIB} MiB)"
cat > "$WORK/syslinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT testguest
PROMPT 0
TIMEOUT 0
LABEL testguest
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND console=ttyS0 quiet
EOF
raw="$WORK/disk.raw"
part="$WORK/part.fat"
truncate -s "${DISK_MIB}M" "$raw"
printf 'label: dos\nlabel-id: 0x7e57c0de\nstart=2048, type=6, bootable\n' | sfdisk -q "$raw"
truncate -s $((DISK_MIB * 1024 * 1024 - 2048 * 512)) "$part"
mkfs.vfat -F 16 -n TESTGUEST -i 7e57c0de "$part" >/dev/null
mcopy -i "$part" "$WORK/vmlinuz" ::/vmlinuz
mcopy -i "$part" "$WORK/initrd.img" ::/initrd.img
mcopy -i "$part" "$WORK/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$part"
dd if="$part" of="$raw" bs=512 seek=2048 conv=notrunc status=none
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$raw" "$WORK/testguest.qcow2"

# ---------------------------------------------------------------- publish
for f in "${outputs[@]}"; do
  mv -f "$WORK/$f" "$OUT/$f.new"
done
for f in "${outputs[@]}"; do
  mv -f "$OUT/$f.new" "$OUT/$f"
done
{
  echo "$STAMP_TEXT"
  echo "kernel-release=$KVER"
  echo "modules=$(wc -l < "$WORK/modules.seen")"
  for f in "${outputs[@]}"; do echo "size.$f=$(stat -c %s "$OUT/$f")"; done
} > "$OUT/BUILD-INFO"
echo "$STAMP_TEXT" > "$OUT/stamp"
for f in "${outputs[@]}"; do
  log "  $(printf '%-16s %10s bytes' "$f" "$(stat -c %s "$OUT/$f")")"
done
log "done: $OUT"
