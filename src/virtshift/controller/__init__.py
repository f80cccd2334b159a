"""The controller (virt-controller's role): one reconciler per kind."""
