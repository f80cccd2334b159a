"""The ``virtshift`` command."""
