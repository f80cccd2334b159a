"""The node agent (virt-handler's role): node status, VMI sync, disks, network, consoles."""
