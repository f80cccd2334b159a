"""The API server (virt-api's role): Kubernetes REST semantics over a Store."""
