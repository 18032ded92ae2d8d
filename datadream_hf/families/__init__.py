"""Generator families, as peft keeps tuners: one module per diffusers pipeline kind, picked from the base model's
`model_index.json` `_class_name`; a new family is one new module and one line in `FAMILIES`.

    base   `GeneratorFamily` (what stages 1 and 2 ask of a generator) and `GeneratorModels` (its loaded parts)
    sd     Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`), the paper's
    sdxl   Stable Diffusion XL (`StableDiffusionXLPipeline`)
    sd3    Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`), without T5
"""

from __future__ import annotations

from ..sources import check_source
from .base import GeneratorFamily, GeneratorModels, PromptEmbeddings, UnsupportedPipelineError
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily

FAMILIES: dict[str, GeneratorFamily] = {
    family.pipeline_class_name: family
    for family in (StableDiffusionFamily(), StableDiffusionXLFamily(), StableDiffusion3Family())
}

__all__ = ["FAMILIES", "GeneratorFamily", "GeneratorModels", "PromptEmbeddings", "UnsupportedPipelineError",
           "family_by_name", "family_for_pipeline_class", "family_of_pipeline", "read_family"]  # fmt: skip


def family_for_pipeline_class(class_name: str | None, where: str) -> GeneratorFamily:
    """The family of a pipeline class name; refuses any other kind in one line that lists the supported ones."""
    if class_name not in FAMILIES:
        raise UnsupportedPipelineError(
            f"{where} is a {class_name or 'pipeline of unknown kind'}, which is not supported: use a base model of "
            f"one of {sorted(FAMILIES)}."
        )
    return FAMILIES[class_name]


def family_of_pipeline(pipeline) -> GeneratorFamily:
    """The family of a loaded pipeline (by its class)."""
    return family_for_pipeline_class(type(pipeline).__name__, f"The pipeline {type(pipeline).__name__}")


def family_by_name(name: str) -> GeneratorFamily | None:
    """The family recorded as `name` (`GeneratorFamily.name`), or None."""
    return next((family for family in FAMILIES.values() if family.name == name), None)


def read_family(pretrained_model_name_or_path: str, revision: str | None = None) -> GeneratorFamily:
    """The family of a base model (local folder or Hub id), from its `model_index.json` alone (no weights load)."""
    from diffusers import DiffusionPipeline

    # A mistyped path is named at once (and a Hub id in offline mode with no cached copy).
    check_source(pretrained_model_name_or_path, "--pretrained_model_name_or_path", required="model_index.json",
                 expected="a diffusers pipeline")  # fmt: skip
    where = f"Base model {pretrained_model_name_or_path!r}"
    try:
        index = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision)
    except (OSError, ValueError) as err:
        raise UnsupportedPipelineError(
            f"{where} has no readable model_index.json ({type(err).__name__}: {str(err).splitlines()[0]}); pass a "
            "diffusers pipeline folder or Hub id."
        ) from err
    return family_for_pipeline_class(index.get("_class_name"), where)
