"""The launcher (virt-launcher and libvirtd's role): VMI spec -> QEMU command line, QMP, supervision."""
