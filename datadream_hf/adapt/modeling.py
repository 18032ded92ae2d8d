"""Stage-1 models and optimization: the frozen generator parts with their LoRA (the generator family's, `families`),
the LoRA init, the diffusion loss (paper Sec. 3.2, as the reference's `datadream.py`; the family's objective), the
AdamW of an adapter, and the adapter file it ends as."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from ..families import GeneratorModels, PromptEmbeddings, read_family
from ..faults import fault_point
from ..lora import ADAPTER_NAME, LORA_WEIGHT_NAME
from ..validation import check_finite_weights
from .config import GeneratorTrainingConfig
from .data import StepBatch, TrainingUnit, init_generator
from .grouped.optim import GroupedAdamW, GroupedGradScaler
from .latent_cache import LatentCache, encode_posterior


def load_generator_models(config: GeneratorTrainingConfig, device: torch.device | str = "cpu") -> GeneratorModels:
    """Loads the base model's parts (its generator family read from `model_index.json`), freezes them, adds the
    denoiser (and text-encoder) LoRA; LoRA weights are kept in fp32."""
    path = config.pretrained_model_name_or_path
    family = read_family(path, config.revision)
    models = family.load_models(path, config.revision, config.variant, config.weight_dtype)
    models.train_text_encoder = config.train_text_encoder
    for model in models.frozen_modules():
        model.requires_grad_(False)
        model.to(device)
    components = models.lora_components()
    targets = family.denoiser_targets(config.unet_target_modules)
    configs = family.lora_configs(config.rank, config.lora_alpha, _peft_init(config.lora_init), targets)
    for name, lora in configs.items():
        if name == family.denoiser_name or config.train_text_encoder:
            components[name].add_adapter(lora, adapter_name=ADAPTER_NAME)
    for model in components.values():
        for parameter in model.parameters():
            if parameter.requires_grad:  # mixed precision: frozen base in fp16/bf16, trained LoRA in fp32
                parameter.data = parameter.data.float()
    if config.gradient_checkpointing:
        models.denoiser.enable_gradient_checkpointing()
        for text_encoder in models.text_encoders.values():
            enable = getattr(text_encoder, "activation_checkpointing_enable", None) or (
                text_encoder.gradient_checkpointing_enable
            )
            enable()
    for model in components.values():
        model.train()
    models.vae.eval()
    return models


def _peft_init(lora_init: str):
    return "gaussian" if lora_init == "gaussian" else True


@torch.no_grad()
def init_lora_weights_(models: GeneratorModels, lora_init: str, unit_seed: int) -> None:
    """Resets every LoRA layer to a fresh init drawn from `unit_seed` (peft's scheme: A random, B = 0).

    This is how cls mode starts each class without reloading the base model, and why an adapter does not depend on
    what was trained before it in the same process.
    """
    generator = init_generator(unit_seed)
    for model in models.lora_components().values():
        for _, module in model.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
                continue
            weight_a, weight_b = module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight
            # Drawn on the CPU generator, then copied: the init is the same on every device.
            fresh = torch.empty(weight_a.shape, dtype=torch.float32)
            if lora_init == "gaussian":
                fresh.normal_(std=1 / module.r[ADAPTER_NAME], generator=generator)
            else:
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            weight_a.copy_(fresh)
            weight_b.zero_()


def encode_prompts(models: GeneratorModels, input_ids: torch.Tensor) -> PromptEmbeddings:
    """The family's prompt embeddings (hidden states (B, T, D), pooled (B, P) where it has them) of `input_ids`
    (B, T), running the text encoders once per distinct prompt.

    A class's batch repeats one prompt. The encoder treats each sequence alone, so encoding the distinct rows and
    indexing gives the same states and, through the index's backward, the same summed LoRA gradient, at 1/B the cost.
    """
    unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)  # (U, T), (B,)
    with torch.set_grad_enabled(models.train_text_encoder and torch.is_grad_enabled()):
        embeddings = models.family.encode_prompts(models, unique)  # (U, T, D), (U, P)
    return embeddings.select(inverse.to(models.device))  # (B, T, D), (B, P)


def diffusion_loss(
    models: GeneratorModels,
    batch: StepBatch,
    weight_dtype: torch.dtype,
    prompt_embeds: PromptEmbeddings | None = None,
) -> torch.Tensor:
    """Per-sample loss of the family's objective (SD: MSE to the noise, or velocity for v-prediction), shape (B,).

    As the reference: latents = VAE posterior sample * scaling factor; no offset noise, no SNR weighting. The prompts
    are encoded here (`encode_prompts`) unless their `prompt_embeds` are given.
    """
    device = models.device
    with torch.no_grad():
        if batch.latent_mean is not None:  # cached posterior of these crops (latent_cache)
            mean, std = batch.latent_mean.to(device), batch.latent_std.to(device)
        else:
            mean, std = encode_posterior(models.vae, batch.pixel_values, weight_dtype, device)
        # posterior.sample() with the step's own noise, so a batch slice is the same draw as the full batch.
        latents = mean + std * batch.latent_noise.to(device, dtype=mean.dtype)
        shift = getattr(models.vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * models.vae.config.scaling_factor
    noise = batch.noise.to(device, dtype=latents.dtype)
    timesteps = batch.timesteps.to(device)
    if prompt_embeds is None:
        prompt_embeds = encode_prompts(models, batch.input_ids)
    return models.family.loss(models, latents, noise, timesteps, prompt_embeds)  # (B,)


def build_latent_cache(
    models: GeneratorModels, unit: TrainingUnit, config: GeneratorTrainingConfig
) -> LatentCache | None:
    """The unit's cached VAE posteriors (`latent_cache`), or None when disabled or its images have too many crops."""
    if not config.cache_latents:
        return None
    # Chunks of the training batch size: the VAE never sees a larger batch than the reference's every-step encode.
    return LatentCache.build(models.vae, unit.images, config.resolution, config.weight_dtype, models.device,
                             batch_size=config.train_batch_size)  # fmt: skip


@dataclass
class UnitOptimizer:
    """The optimization state of one adapter: AdamW, its lr schedule and (fp16 only) the loss scaler."""

    parameters: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    grad_scaler: torch.amp.GradScaler


def build_unit_optimizer(
    parameters: dict[str, torch.nn.Parameter],
    config: GeneratorTrainingConfig,
    num_steps: int,
    device_type: str,
    num_groups: int | None = None,
) -> UnitOptimizer:
    """AdamW(lr, betas, wd, eps) with diffusers' `get_scheduler` (cosine with 100 warm-up steps by default).

    With `num_groups` (grouped LoRA stacks), `GroupedAdamW` and `GroupedGradScaler`: each group steps and scales its
    loss as its own AdamW and GradScaler would.
    """
    from diffusers.optimization import get_scheduler

    hyperparameters = {"lr": config.learning_rate, "betas": (config.adam_beta1, config.adam_beta2),
                       "weight_decay": config.adam_weight_decay, "eps": config.adam_epsilon}  # fmt: skip
    fp16 = config.mixed_precision == "fp16"
    if num_groups is None:
        optimizer = torch.optim.AdamW(list(parameters.values()), **hyperparameters)
        scaler = torch.amp.GradScaler(device_type, enabled=fp16)
    else:
        optimizer = GroupedAdamW(list(parameters.values()), num_groups, **hyperparameters)
        scaler = GroupedGradScaler(num_groups, enabled=fp16)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=num_steps
    )
    return UnitOptimizer(parameters, optimizer, lr_scheduler, scaler)


def save_adapter_atomic(models: GeneratorModels, folder: Path) -> Path:
    """Writes `folder/pytorch_lora_weights.safetensors` via a temp folder, so the file is whole or absent (a failed
    write removes the temp folder); LoRA weights holding NaN or inf are refused (`NonFiniteError`)."""
    check_finite_weights(models.trainable_parameters(), f"the adapter {str(folder / LORA_WEIGHT_NAME)!r}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".adapter-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        components = (
            models.lora_components() if models.train_text_encoder else {models.family.denoiser_name: models.denoiser}
        )
        written = models.family.save_lora(tmp, components)
        fault_point("adapter-write")  # test hook: the adapter exists only in the temp folder
        os.replace(written, folder / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / LORA_WEIGHT_NAME
