"""Storage: images (qemu-img), the cluster image store, cloud-init ISOs, volumes."""
