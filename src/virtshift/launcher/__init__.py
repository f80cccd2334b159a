"""The launcher (virt-launcher and libvirtd's role): VMI spec to QEMU argv, QMP, supervision."""
