"""Library versions recorded in every artifact, so an output says what made it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

TRACKED_PACKAGES = (
    "datadream_hf",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "huggingface_hub",
)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions
