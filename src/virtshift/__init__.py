"""virtshift: KubeVirt's API and real QEMU virtual machines, without a Kubernetes cluster."""

from virtshift import native

__version__ = "0.1.0"

native.install()  # the compiled hot modules, when a build matching the sources exists
