"""virtshift: KubeVirt's API and real QEMU virtual machines, without a Kubernetes cluster."""

__version__ = "0.1.0"
