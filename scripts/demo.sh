#!/usr/bin/env bash
# `make demo`: runs `virtshift up` in the foreground with two nodes, imports the test guest and
# starts a demo VM, then prints how to reach it. Ctrl+C stops the platform (VMs keep running
# and are re-attached by the next `virtshift up`; `virtshift stop demo` stops the VM).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$REPO/.venv/bin
DATA=${VIRTSHIFT_HOME:-$HOME/.virtshift}
GUEST=$REPO/.cache/guest
export KUBECONFIG=$DATA/kubeconfig

"$BIN/virtshift" up --data-dir "$DATA" --nodes "${VIRTSHIFT_NODES:-2}" &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up' INT TERM
for _ in $(seq 600); do
  "$BIN/kubectl" get node node01 >/dev/null 2>&1 && break
  kill -0 $up 2>/dev/null || exit 1
  sleep 0.1
done
if ! "$BIN/virtshift" image list 2>/dev/null | grep -q '^virtshift/testguest:latest '; then
  "$BIN/virtshift" image import virtshift/testguest:latest "$GUEST/testguest.qcow2"
fi
if ! "$BIN/virtshift" image list 2>/dev/null | grep -q '^virtshift/testguest-kernel:latest '; then
  "$BIN/virtshift" image import virtshift/testguest-kernel:latest --kernel "$GUEST/vmlinux" \
    --initrd "$GUEST/initrd.img" --cmdline "console=ttyS0 quiet"
fi
"$BIN/kubectl" apply -f - <<'YAML'
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: demo
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        devices:
          disks:
          - name: rootdisk
            disk: {bus: virtio}
          - name: cloudinit
            disk: {bus: virtio}
          interfaces:
          - name: default
            masquerade: {}
            ports:
            - port: 80
        memory:
          guest: 128Mi
      networks:
      - name: default
        pod: {}
      terminationGracePeriodSeconds: 30
      volumes:
      - name: rootdisk
        containerDisk:
          image: virtshift/testguest:latest
      - name: cloudinit
        cloudInitNoCloud:
          userData: |
            #!/bin/sh
            echo "hello from the virtshift demo VM"
YAML
cat <<EOF

The demo VM is starting. In another terminal:
  export KUBECONFIG=$KUBECONFIG
  $BIN/kubectl get vm,vmi                 # demo: Running
  $BIN/virtshift console demo             # serial console (Ctrl+] leaves)
  $BIN/virtshift port-forward vm/demo 8080:80   # then: curl http://127.0.0.1:8080/
  $BIN/virtshift vnc demo --proxy-only    # a port for any VNC viewer
  $BIN/virtshift migrate demo             # live-migrate it to the other node
  $BIN/virtshift drain NODE               # move everything off a node; uncordon NODE after
  $BIN/virtshift stop demo                # stop it; virtshift start demo starts it again
Ctrl+C here stops the platform.
EOF
wait $up
