"""Stage 1 of DataDream: LoRA-adapt Stable Diffusion on the few-shot images (one adapter per dataset or per class).

The pieces are separate so that they can be tested and reused: `load_generator_models` (frozen base + LoRA),
`diffusion_loss` and `training_step` (one step of one adapter), `train_unit` (one adapter, with checkpoints and
resume) and `train_generator` (dset or cls mode, split across processes, writing the stage-1 output folder).
The settings, `GeneratorTrainingConfig`, live in `generator_config` and are re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from . import generator_outputs
from .faults import kill_point
from .generator_checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_log_history,
    remove_partial_checkpoints,
    save_checkpoint,
)
from .generator_config import GeneratorTrainingConfig
from .generator_data import (
    StepBatch,
    TrainingUnit,
    class_seed,
    init_generator,
    make_step_batch,
    make_unit,
    tokenize_prompts,
    total_steps,
)
from .generator_outputs import FewShotData
from .grouped_optim import GroupedAdamW, GroupedGradScaler
from .latent_cache import LatentCache, encode_posterior
from .lora import ADAPTER_NAME, LORA_WEIGHT_NAME, generator_lora_configs, save_generator_lora
from .run_folder import class_folder_name, output_dir_lock

logger = logging.getLogger(__name__)


@dataclass
class GeneratorModels:
    """The Stable Diffusion parts stage 1 trains through; only their LoRA weights require grad."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    train_text_encoder: bool = True

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.unet.config.in_channels, resolution // factor, resolution // factor)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The LoRA parameters by name (`unet.` / `text_encoder.` prefixed), in a fixed order."""
        models = {"unet": self.unet, "text_encoder": self.text_encoder}
        return {
            f"{prefix}.{name}": p
            for prefix, model in models.items()
            for name, p in model.named_parameters()
            if p.requires_grad
        }


def load_generator_models(config: GeneratorTrainingConfig, device: torch.device | str = "cpu") -> GeneratorModels:
    """Loads the base model, freezes it, adds the UNet (and text-encoder) LoRA; LoRA weights are kept in fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = config.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=config.revision)
    # The reference trains with DDPM noising whatever the model's sampling scheduler is.
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=config.revision)
    # Safetensors only: a pickled checkpoint could run code when loaded.
    weights = {"revision": config.revision, "variant": config.variant, "torch_dtype": config.weight_dtype,
               "use_safetensors": True}  # fmt: skip
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"{path!r}: scheduler prediction_type {noise_scheduler.config.prediction_type!r} is not supported; "
            "stage 1 trains 'epsilon' or 'v_prediction' models."
        )
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(device)
    unet_lora, text_lora = generator_lora_configs(config.rank, config.lora_alpha, _peft_init(config.lora_init))
    unet.add_adapter(unet_lora, adapter_name=ADAPTER_NAME)
    if config.train_text_encoder:
        text_encoder.add_adapter(text_lora, adapter_name=ADAPTER_NAME)
    for model in (unet, text_encoder):
        for parameter in model.parameters():
            if parameter.requires_grad:  # mixed precision: frozen base in fp16/bf16, trained LoRA in fp32
                parameter.data = parameter.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        enable = getattr(text_encoder, "activation_checkpointing_enable", None) or (
            text_encoder.gradient_checkpointing_enable
        )
        enable()
    unet.train()
    text_encoder.train()
    vae.eval()
    return GeneratorModels(tokenizer, text_encoder, vae, unet, noise_scheduler, config.train_text_encoder)


def _peft_init(lora_init: str):
    return "gaussian" if lora_init == "gaussian" else True


@torch.no_grad()
def init_lora_weights_(models: GeneratorModels, lora_init: str, unit_seed: int) -> None:
    """Resets every LoRA layer to a fresh init drawn from `unit_seed` (peft's scheme: A random, B = 0).

    This is how cls mode starts each class without reloading the base model, and why an adapter does not depend on
    what was trained before it in the same process.
    """
    generator = init_generator(unit_seed)
    for model in (models.unet, models.text_encoder):
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


def encode_prompts(models: GeneratorModels, input_ids: torch.Tensor) -> torch.Tensor:
    """Text-encoder hidden states (B, T, D) of `input_ids` (B, T), running the encoder once per distinct prompt.

    A class's batch repeats one prompt. The encoder treats each sequence alone, so encoding the distinct rows and
    indexing gives the same states and, through the index's backward, the same summed LoRA gradient, at 1/B the cost.
    """
    unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)  # (U, T), (B,)
    with torch.set_grad_enabled(models.train_text_encoder and torch.is_grad_enabled()):
        hidden = models.text_encoder(unique.to(models.device), return_dict=False)[0]  # (U, T, D)
    return hidden[inverse.to(models.device)]  # (B, T, D)


def diffusion_loss(
    models: GeneratorModels,
    batch: StepBatch,
    weight_dtype: torch.dtype,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MSE between the UNet's prediction and its target (noise, or velocity for v-prediction), shape (B,).

    As the reference: latents = VAE posterior sample * scaling factor; no offset noise, no SNR weighting. The prompts
    are encoded here (`encode_prompts`) unless their `encoder_hidden_states` (B, T, D) are given.
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
    noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
    if encoder_hidden_states is None:
        encoder_hidden_states = encode_prompts(models, batch.input_ids)
    prediction = models.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    if models.noise_scheduler.config.prediction_type == "v_prediction":
        target = models.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)


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


def training_step(
    models: GeneratorModels,
    state: UnitOptimizer,
    batch: StepBatch,
    config: GeneratorTrainingConfig,
    shard: tuple[int, int] = (0, 1),
) -> float:
    """One optimization step of one adapter on `batch`; returns the batch's mean loss.

    With `shard = (rank, world)`, this process computes only its slice of the batch and gradients are summed across
    processes, which gives the 1-process step (data parallelism of dset mode).
    """
    rank, world = shard
    start, stop = rank * len(batch) // world, (rank + 1) * len(batch) // world
    params = list(state.parameters.values())
    loss_sum = torch.zeros((), device=models.device)
    if stop > start:
        # 1. Sum of per-sample losses / full batch size = the batch mean, however the batch is split.
        loss_sum = diffusion_loss(models, batch.slice(start, stop), config.weight_dtype).sum()
        state.grad_scaler.scale(loss_sum / len(batch)).backward()
        loss_sum = loss_sum.detach()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        # 2. Sum the slices' gradients (and losses) over processes, in one flat buffer.
        flat = torch.cat([p.grad.flatten() for p in params] + [loss_sum.reshape(1)])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        loss_sum = flat[-1]
    kill_point("generator-step")  # test hook (datadream_hf.faults): a kill here loses only this step
    # 3. Clip, step, schedule.
    state.grad_scaler.unscale_(state.optimizer)
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    state.grad_scaler.step(state.optimizer)
    state.grad_scaler.update()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / len(batch)


StepCallback = Callable[[TrainingUnit, int], None]


def train_unit(
    models: GeneratorModels,
    unit: TrainingUnit,
    config: GeneratorTrainingConfig,
    accelerator,
    shard: tuple[int, int] = (0, 1),
    step_callback: StepCallback | None = None,
) -> Path:
    """Trains one adapter from its seeded init (or its latest checkpoint) and writes it atomically; returns its file.

    `step_callback(unit, steps_done)` runs after every step (and its checkpoint), e.g. to log or to stop.
    """
    folder = Path(config.output_dir) / unit.folder
    writes = shard[0] == 0  # in data-parallel dset mode only rank 0 writes
    num_steps = total_steps(len(unit), config.train_batch_size, config.num_train_epochs, config.max_train_steps)
    init_lora_weights_(models, config.lora_init, unit.seed)
    state = build_unit_optimizer(models.trainable_parameters(), config, num_steps, models.device.type)
    meta = checkpoint_meta(unit, config, num_steps)
    first_step, log_history = 0, []
    if config.resume_from_checkpoint is not None:
        checkpoint = (
            latest_checkpoint(folder)
            if config.resume_from_checkpoint == "latest"
            else Path(config.resume_from_checkpoint)
        )
        if checkpoint is None:
            logger.info("No checkpoint for %r in %s: training it from the start.", unit.name, folder)
        else:
            first_step = load_checkpoint(checkpoint, state.parameters, state.optimizer, state.lr_scheduler,
                                         state.grad_scaler, meta)  # fmt: skip
            log_history = read_log_history(checkpoint)
            logger.info("Resuming %r from %s (step %d of %d).", unit.name, checkpoint, first_step, num_steps)
    if writes:
        remove_partial_checkpoints(folder)
    latent_shape = models.latent_shape(config.resolution)
    num_timesteps = models.noise_scheduler.config.num_train_timesteps
    cache = build_latent_cache(models, unit, config) if first_step < num_steps else None
    prefix = "" if config.mode == "dset" else f"{unit.folder}/"
    progress = _progress(accelerator, num_steps, first_step, unit.name)
    for step in range(first_step, num_steps):
        batch = make_step_batch(unit, step, config.train_batch_size, config.resolution, latent_shape, num_timesteps,
                                cache)  # fmt: skip
        loss = training_step(models, state, batch, config, shard)
        done = step + 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        log_history.append({"step": done, "loss": loss, "lr": state.lr_scheduler.get_last_lr()[0]})
        accelerator.log({f"{prefix}loss": loss, f"{prefix}lr": log_history[-1]["lr"]}, step=done)
        if writes and done % config.checkpointing_steps == 0 and done < num_steps:
            save_checkpoint(folder, done, state.parameters, state.optimizer, state.lr_scheduler, state.grad_scaler,
                            meta, log_history)  # fmt: skip
            prune_checkpoints(folder, config.checkpoints_total_limit)
        if step_callback is not None:
            step_callback(unit, done)
    progress.close()
    adapter = folder / LORA_WEIGHT_NAME
    if writes:
        generator_outputs.write_training_log(folder, log_history)  # before the adapter, which marks the unit done
        save_adapter_atomic(models, folder)
    return adapter


def checkpoint_meta(unit: TrainingUnit, config: GeneratorTrainingConfig, num_steps: int) -> dict:
    """What an adapter's checkpoints belong to; `load_checkpoint` refuses a checkpoint whose meta differs."""
    return {
        "unit": unit.name, "seed": unit.seed, "num_images": len(unit), "num_steps": num_steps,
        "train_batch_size": config.train_batch_size, "rank": config.rank, "lora_alpha": config.lora_alpha,
    }  # fmt: skip


def build_latent_cache(
    models: GeneratorModels, unit: TrainingUnit, config: GeneratorTrainingConfig
) -> LatentCache | None:
    """The unit's cached VAE posteriors (`latent_cache`), or None when disabled or its images have too many crops."""
    if not config.cache_latents:
        return None
    # Chunks of the training batch size: the VAE never sees a larger batch than the reference's every-step encode.
    return LatentCache.build(models.vae, unit.images, config.resolution, config.weight_dtype, models.device,
                             batch_size=config.train_batch_size)  # fmt: skip


def _progress(accelerator, total: int, initial: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"adapter {name}", disable=not accelerator.is_local_main_process)


def save_adapter_atomic(models: GeneratorModels, folder: Path) -> Path:
    """Writes `folder/pytorch_lora_weights.safetensors` via a temp folder, so the file is whole or absent."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".adapter-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    written = save_generator_lora(tmp, models.unet, models.text_encoder if models.train_text_encoder else None)
    kill_point("adapter-write")  # test hook: the adapter exists only in the temp folder
    os.replace(written, folder / LORA_WEIGHT_NAME)
    shutil.rmtree(tmp)
    return folder / LORA_WEIGHT_NAME


def build_units(
    config: GeneratorTrainingConfig, data: FewShotData, tokenizer, process_index: int = 0, num_processes: int = 1
) -> list[TrainingUnit]:
    """The adapters this process trains: dset -> the one over all images; cls -> classes i with i % P == rank."""
    template = config.prompt_template()
    class_prompt_ids = tokenize_prompts(tokenizer, [template(name) for name in data.class_names])
    if config.mode == "dset":
        return [make_unit("all", ".", config.seed, data.images, data.labels, class_prompt_ids, config.resolution)]
    units = []
    for index, name in enumerate(data.class_names):
        if index % num_processes != process_index:
            continue
        rows = [row for row, label in enumerate(data.labels) if label == index]
        images = [data.images[row] for row in rows]
        folder = class_folder_name(index, name)
        seed = class_seed(config.seed, index)
        units.append(make_unit(name, folder, seed, images, [index] * len(rows), class_prompt_ids, config.resolution))
    return units


def train_generator(
    config: GeneratorTrainingConfig,
    data: FewShotData,
    accelerator,
    models: GeneratorModels | None = None,
    step_callback: StepCallback | None = None,
) -> Path:
    """Runs stage 1 into `config.output_dir` (dset or cls mode) and writes the index, run config and card.

    Args:
        data: the few-shot images (`generator_outputs.load_few_shot_data`).
        accelerator: an `accelerate.Accelerator`; in cls mode each process trains its own classes, in dset mode the
            processes split each batch.
        models: already loaded models (`load_generator_models(config)`) to reuse; loaded here when None.
        step_callback: called as `step_callback(unit, steps_done)` after every step.

    The main process holds the folder's lock (`locking.OutputDirLock`) for the whole run, so a second run into the same
    `output_dir` is refused instead of mixing its files with this one's.
    """
    # Refuse another run's folder before taking the lock, which creates the folder.
    resume = config.resume_from_checkpoint is not None
    generator_outputs.check_output_dir(Path(config.output_dir), generator_outputs.run_record(config, data), resume)
    with output_dir_lock(config.output_dir, accelerator):
        return _train_generator(config, data, accelerator, models, step_callback)


def _train_generator(config, data, accelerator, models, step_callback) -> Path:
    output_dir = Path(config.output_dir)
    # 1. Refuse to mix with another run before anything expensive (checked by every process, then written by one).
    record = generator_outputs.run_record(config, data)
    generator_outputs.check_output_dir(output_dir, record, resume=config.resume_from_checkpoint is not None)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        generator_outputs.write_run_record(output_dir, record)

    # 2. Load the base model once; every adapter of this process is trained on it.
    if models is None:
        models = load_generator_models(config, accelerator.device)
    units = build_units(config, data, models.tokenizer, accelerator.process_index, accelerator.num_processes)
    logger.info(
        "Process %d of %d trains adapter(s) %s.",
        accelerator.process_index, accelerator.num_processes, [unit.name for unit in units],
    )  # fmt: skip
    shard = (accelerator.process_index, accelerator.num_processes) if config.mode == "dset" else (0, 1)

    # 3. Train each adapter; a finished one (its file exists, written atomically) is skipped on resume. Grouped cls
    #    mode trains several classes per forward pass (grouped_training): the same computation up to float rounding.
    if config.mode == "cls" and config.cls_strategy == "grouped":
        from .grouped_training import train_groups

        train_groups(models, units, config, accelerator, data.class_names, step_callback)
    else:
        for unit in units:
            adapter = output_dir / unit.folder / LORA_WEIGHT_NAME
            if config.resume_from_checkpoint is not None and adapter.is_file():
                logger.info("Adapter %r is already trained (%s): skipping it.", unit.name, adapter)
                continue
            train_unit(models, unit, config, accelerator, shard, step_callback)
            if config.num_validation_images > 0 and shard[0] == 0:
                generator_outputs.log_validation(models, unit, config, data.class_names, accelerator)

    # 4. Once every process is done: the index (which marks the output complete) and the card; the curves of the
    #    classes other processes trained go to the trackers, which live on the main process.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = generator_outputs.missing_adapters(output_dir, config.mode, data.class_names)
        if missing:
            raise CheckpointError(f"Adapters missing after training: {missing}; re-run with --resume_from_checkpoint.")
        generator_outputs.write_outputs(output_dir, config.mode, data.class_names)
        if config.mode == "cls" and config.report_to and accelerator.num_processes > 1:
            others = [class_folder_name(i, name) for i, name in enumerate(data.class_names)
                      if i % accelerator.num_processes != accelerator.process_index]  # fmt: skip
            generator_outputs.replay_to_trackers(output_dir, others, accelerator)
    accelerator.wait_for_everyone()
    return output_dir
