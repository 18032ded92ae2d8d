"""Jinja model-card templates, shipped in the wheel as `datadream_hf.model_cards` (read with importlib.resources)."""
