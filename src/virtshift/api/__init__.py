"""API kinds as data, typed models, defaulting and validation (admission)."""
