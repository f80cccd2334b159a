"""Helpers for tests: running the platform as a real process, and object builders."""
