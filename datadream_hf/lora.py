"""LoRA placements of DataDream (generator UNet + text encoder, CLIP classifier), diffusers-format adapter I/O, and
the safetensors-only rule for every weights file the package loads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from .files import check_safetensors

# Paper Sec. 3.2 / reference `datadream.py`: self- and cross-attention projections of the UNet, and every
# attention projection of the CLIP text encoder.
UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Reference classifier (`classify/`): LoRA on Q and V of every block of both CLIP towers.
CLASSIFIER_TARGET_MODULES = ["q_proj", "v_proj"]

ADAPTER_NAME = "default"  # the peft adapter stage 1 trains in the UNet and text encoder (peft's default name)
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights formats that unpickle, i.e. can run code


def generator_lora_configs(
    rank: int = 16,
    alpha: int | None = None,
    init: str | bool = "gaussian",
    unet_target_modules: list[str] | None = None,
):
    """The (UNet, text encoder) `LoraConfig`s of stage 1. `alpha` defaults to `rank`, as in the reference;
    `unet_target_modules` to DataDream's (`UNET_TARGET_MODULES`)."""
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1, got {rank}.")
    alpha = rank if alpha is None else alpha
    targets = list(unet_target_modules or UNET_TARGET_MODULES)
    unet = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=targets)
    text = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=TEXT_ENCODER_TARGET_MODULES)
    return unet, text


def classifier_lora_config(
    rank: int = 16, alpha: int = 32, dropout: float = 0.1, target_modules: list[str] | None = None
) -> LoraConfig:
    """The stage-3 CLIP `LoraConfig` (reference defaults: r=16, alpha=32, dropout 0.1 on q_proj and v_proj)."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules or CLASSIFIER_TARGET_MODULES),
    )


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of a peft-injected model, by name."""
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def save_generator_lora(
    output_dir: str | os.PathLike,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    adapter_name: str = ADAPTER_NAME,
) -> Path:
    """Writes `pytorch_lora_weights.safetensors`, loadable by `StableDiffusionPipeline.load_lora_weights`."""
    from diffusers import StableDiffusionPipeline

    components = {"unet": unet, "text_encoder": text_encoder}
    return save_pipeline_lora(output_dir, StableDiffusionPipeline, components, adapter_name)


def save_pipeline_lora(
    output_dir: str | os.PathLike,
    pipeline_class,
    components: dict[str, torch.nn.Module | None],
    adapter_name: str = ADAPTER_NAME,
    diffusers_keys: bool = True,
) -> Path:
    """Writes the peft adapter `adapter_name` of each component (pipeline names: `unet`, `transformer`,
    `text_encoder`, `text_encoder_2`; None: left out) with `pipeline_class.save_lora_weights`, with its r, alpha and
    targets as metadata: `pipeline_class.load_lora_weights` reads the file.

    `diffusers_keys`: the keys converted to diffusers' own spelling, as its UNet pipelines' LoRA scripts save them;
    False keeps peft's (`lora_A` / `lora_B`), which is what the transformer pipelines (SD3, Flux) load: their loaders
    skip diffusers-spelled attention keys (`to_q.lora.down`) without an error.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    # The vocabulary is never resized here: no base embeddings to save, and no Hub lookup of the base model's config
    # (peft's "auto" asks the Hub at every save, then warns when it cannot).
    def lora_layers(model):
        state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        return convert_state_dict_to_diffusers(state) if diffusers_keys else state

    def metadata(model):
        config = model.peft_config[adapter_name]
        return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}

    kwargs = {}
    for name, model in components.items():
        if model is not None:
            kwargs[f"{name}_lora_layers"] = lora_layers(model)
            kwargs[f"{name}_lora_adapter_metadata"] = metadata(model)
    pipeline_class.save_lora_weights(save_directory=str(output_dir), safe_serialization=True, **kwargs)
    return Path(output_dir) / LORA_WEIGHT_NAME


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a weights file, refusing pickle formats (.bin/.pt/.pth/.ckpt), which can run arbitrary code."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"Refusing to load {str(path)!r}: only .safetensors weights are loaded (pickle files can execute code). "
            "Convert it with `safetensors.torch.save_file`."
        )
    if not path.is_file():
        pickles = pickled_weight_files(path.parent)
        if pickles:
            raise ValueError(
                f"Refusing to load {pickles} from {str(path.parent)!r}: pickled weights can execute code when loaded, "
                f"and {path.name} (safetensors) is missing. Convert the weights with `safetensors.torch.save_file`."
            )
        raise FileNotFoundError(f"Weights file {str(path)!r} does not exist.")
    check_safetensors(path, "Weights file", "Restore it, or remove it and re-run the stage that wrote it.")
    return load_file(str(path))


def pickled_weight_files(folder: str | os.PathLike) -> list[str]:
    """The names of the pickle-format weights files in `folder` (never loaded: say so when they are all there is)."""
    return sorted(p.name for p in Path(folder).glob("*") if p.suffix in PICKLE_SUFFIXES)
