"""Renders the model and dataset cards in `model_cards/` (shipped in the wheel as `datadream_hf.model_cards`)."""

from __future__ import annotations

from importlib import resources

import jinja2

TEMPLATE_PACKAGE = "datadream_hf.model_cards"


def available_templates() -> list[str]:
    return sorted(p.name for p in resources.files(TEMPLATE_PACKAGE).iterdir() if p.name.endswith(".md"))


def render_card(template_name: str, **context) -> str:
    """Renders `model_cards/<template_name>` with `context`; a missing variable is an error, not a blank."""
    source = resources.files(TEMPLATE_PACKAGE).joinpath(template_name)
    if not source.is_file():
        raise FileNotFoundError(f"No card template {template_name!r}; available: {available_templates()}.")
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(source.read_text(encoding="utf-8")).render(**context)
