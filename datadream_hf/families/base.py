"""What stages 1 and 2 ask of a generator family: `GeneratorFamily` (load its parts, encode prompts, the training loss,
where LoRA goes, the adapter file in the pipeline's own format) and `GeneratorModels`, its loaded parts.

A family is one diffusers pipeline kind (`model_index.json`'s `_class_name`). The training engine sees only
`GeneratorModels`: named LoRA components (denoiser first, then the text encoders), a VAE, prompt embeddings and a
per-sample loss, never a UNet or a transformer by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from peft import LoraConfig

from ..errors import InputError
from ..lora import ADAPTER_NAME, save_pipeline_lora


class UnsupportedPipelineError(InputError):
    """A base model whose pipeline kind no generator family handles; the message lists the supported ones."""


@dataclass
class PromptEmbeddings:
    """A batch's text conditioning: `hidden` (B, T, D) token states and, where the family has them, `pooled` (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> PromptEmbeddings:
        """Rows `index` (B',) of the batch (e.g. the distinct prompts' states gathered back to every sample)."""
        return PromptEmbeddings(self.hidden[index], None if self.pooled is None else self.pooled[index])


@dataclass
class GeneratorModels:
    """A generator's parts as stage 1 trains through them; only their LoRA weights require grad.

    Attributes:
        family: the generator family that loaded them.
        tokenizers: one per text encoder, in the family's order; prompt ids are their ids concatenated.
        text_encoders: component name (`text_encoder`, `text_encoder_2`) -> encoder, in the family's order.
        denoiser: the UNet or transformer, under the family's `denoiser_name`.
    """

    family: GeneratorFamily
    tokenizers: list
    text_encoders: dict[str, torch.nn.Module]
    vae: torch.nn.Module
    denoiser: torch.nn.Module
    noise_scheduler: object
    train_text_encoder: bool = True

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.vae_scale_factor
        return (self.denoiser.config.in_channels, resolution // factor, resolution // factor)

    def lora_components(self) -> dict[str, torch.nn.Module]:
        """The components that carry LoRA, by pipeline name: the denoiser, then the text encoders."""
        return {self.family.denoiser_name: self.denoiser, **self.text_encoders}

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [*self.lora_components().values(), self.vae]

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The LoRA parameters by name (prefixed with their component, e.g. `unet.`), in a fixed order."""
        return {
            f"{prefix}.{name}": p
            for prefix, model in self.lora_components().items()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    def tokenizer_lengths(self) -> list[int]:
        return [tokenizer.model_max_length for tokenizer in self.tokenizers]

    # The first tokenizer and text encoder, and the denoiser under the name SD 1/2 and SDXL give it.
    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return next(iter(self.text_encoders.values()))

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser


class GeneratorFamily:
    """One pipeline kind: its parts, prompt encoding, training loss, LoRA placement and adapter format.

    Subclasses set the class attributes and implement `encode_prompts` and `loss`; registering an instance in
    `families.FAMILIES` makes stages 1 and 2 accept the pipeline kind.
    """

    name: ClassVar[str]  # recorded with the adapters (`adapt.outputs.run_record`)
    pipeline_class_name: ClassVar[str]  # diffusers' pipeline class, as `model_index.json` names it
    denoiser_name: ClassVar[str] = "unet"
    denoiser_class_name: ClassVar[str] = "UNet2DConditionModel"  # diffusers class
    tokenizer_classes: ClassVar[dict[str, str]] = {"tokenizer": "CLIPTokenizer"}  # transformers classes
    text_encoder_classes: ClassVar[dict[str, str]] = {"text_encoder": "CLIPTextModel"}  # transformers classes
    noise_scheduler_class_name: ClassVar[str] = "DDPMScheduler"  # the training noise schedule (diffusers class)
    denoiser_target_modules: ClassVar[list[str]]
    text_encoder_target_modules: ClassVar[list[str]] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    pipeline_kwargs: ClassVar[dict] = {}  # extra `from_pretrained` arguments of the pipeline (e.g. parts left out)
    diffusers_lora_keys: ClassVar[bool] = True  # adapter keys in diffusers' spelling (UNet pipelines) or peft's

    # --- loading ------------------------------------------------------------------------------------------------

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_models(self, path: str, revision: str | None, variant: str | None, dtype: torch.dtype) -> GeneratorModels:
        """The frozen parts (no LoRA yet) in `dtype`; safetensors only: a pickled checkpoint could run code."""
        import diffusers
        import transformers

        weights = {"revision": revision, "variant": variant, "torch_dtype": dtype, "use_safetensors": True}
        tokenizers = [
            getattr(transformers, cls).from_pretrained(path, subfolder=name, revision=revision)
            for name, cls in self.tokenizer_classes.items()
        ]
        text_encoders = {
            name: getattr(transformers, cls).from_pretrained(path, subfolder=name, **weights)
            for name, cls in self.text_encoder_classes.items()
        }
        vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
        denoiser = getattr(diffusers, self.denoiser_class_name).from_pretrained(
            path, subfolder=self.denoiser_name, **weights
        )
        scheduler_class = getattr(diffusers, self.noise_scheduler_class_name)
        noise_scheduler = scheduler_class.from_pretrained(path, subfolder="scheduler", revision=revision)
        self.check_noise_scheduler(noise_scheduler, path)
        return GeneratorModels(self, tokenizers, text_encoders, vae, denoiser, noise_scheduler)

    def check_noise_scheduler(self, noise_scheduler, path: str) -> None:
        """Refuses a model whose training objective this family does not implement."""

    # --- LoRA ---------------------------------------------------------------------------------------------------

    def denoiser_targets(self, mode_targets: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The denoiser modules LoRA targets: a training mode's (e.g. LoFT's `add_k_proj`, `add_v_proj`), then the
        family's own placement; peft skips the names a model does not have."""
        return list(dict.fromkeys([*mode_targets, *self.denoiser_target_modules]))

    def lora_configs(
        self, rank: int, alpha: int | None, init, denoiser_targets: list[str] | None = None
    ) -> dict[str, LoraConfig]:
        """Component name -> its `LoraConfig` (the paper's placement: attention projections, or `denoiser_targets`
        in the denoiser; `alpha` defaults to `rank`, as in the reference)."""
        if rank < 1:
            raise ValueError(f"`rank` must be >= 1, got {rank}.")
        alpha = rank if alpha is None else alpha

        def config(targets):
            return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(targets))

        text = {name: config(self.text_encoder_target_modules) for name in self.text_encoder_classes}
        return {self.denoiser_name: config(denoiser_targets or self.denoiser_target_modules), **text}

    def lora_record(self, train_text_encoder: bool, denoiser_targets: list[str] | None = None) -> dict:
        """The target modules, as the run record lists them (`adapt.outputs.run_record`)."""
        return {
            f"{self.denoiser_name}_target_modules": list(denoiser_targets or self.denoiser_target_modules),
            "text_encoder_target_modules": list(self.text_encoder_target_modules) if train_text_encoder else None,
        }

    def save_lora(
        self, output_dir: str | Path, components: dict[str, torch.nn.Module], adapter_name: str = ADAPTER_NAME
    ) -> Path:
        """Writes `pytorch_lora_weights.safetensors` with the pipeline class's `save_lora_weights`, so that its
        `load_lora_weights` reads it."""
        pipeline_class = self.pipeline_class()
        return save_pipeline_lora(output_dir, pipeline_class, components, adapter_name, self.diffusers_lora_keys)

    def pipeline_lora_components(self, pipeline) -> dict[str, torch.nn.Module]:
        """The components of a loaded pipeline that adapters of this family may hold LoRA weights for."""
        names = [self.denoiser_name, *self.text_encoder_classes]
        return {name: getattr(pipeline, name) for name in names if getattr(pipeline, name, None) is not None}

    # --- training -----------------------------------------------------------------------------------------------

    def encode_prompts(self, models: GeneratorModels, input_ids: torch.Tensor) -> PromptEmbeddings:
        """The conditioning of `input_ids` (B, sum of the tokenizers' lengths), as the family's pipeline makes it."""
        raise NotImplementedError

    def loss(
        self,
        models: GeneratorModels,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: PromptEmbeddings,
    ) -> torch.Tensor:
        """Per-sample training loss (B,) of clean `latents` (B, C, h, w), `noise` like them and `timesteps` (B,)
        drawn uniformly from [0, num_train_timesteps)."""
        raise NotImplementedError

    # --- sampling -----------------------------------------------------------------------------------------------

    def denoiser(self, pipeline) -> torch.nn.Module:
        return getattr(pipeline, self.denoiser_name)

    def resolution_multiple(self, denoiser: torch.nn.Module, vae_scale_factor: int) -> int:
        """What the image side must divide by: the VAE's factor times the denoiser's own downsampling."""
        return vae_scale_factor * 2 ** (len(denoiser.config.block_out_channels) - 1)
