"""Async API client used by the controller, node agents, CLI and web console."""
