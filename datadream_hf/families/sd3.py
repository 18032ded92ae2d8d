"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): CLIP-L and CLIP-G text encoders (T5 left out), an MMDiT
transformer with joint attention, trained by flow matching.

Without T5, prompts are encoded as the pipeline encodes them when `text_encoder_3` is None: the two CLIP encoders'
penultimate states side by side, zero-padded to the joint attention width, then `T5_SEQUENCE_LENGTH` zero tokens; the
pooled embedding is both projections side by side. Stage 2 loads the pipeline without T5 too, so the adapters are
sampled under the conditioning they were trained with (and 4.7B parameters are never loaded).

The loss is diffusers' SD3 DreamBooth LoRA script's defaults: x_t = (1 - s) x_0 + s * noise with s drawn by the
logit-normal density (`--weighting_scheme logit_normal`, mean 0, std 1) over the scheduler's training sigmas, the
prediction preconditioned to an x_0 estimate (`--precondition_outputs 1`: x_t - s * v) and regressed on x_0 with unit
weights (the logit-normal scheme weights by its sampling density only). LoRA on every attention projection of the
transformer, joint-attention `add_*_proj` / `to_add_out` included, and on both CLIP encoders; never on T5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lora import TEXT_ENCODER_TARGET_MODULES
from .base import GeneratorFamily, GeneratorModels, PromptEmbeddings

T5_SEQUENCE_LENGTH = 256  # the pipeline's default `max_sequence_length`: the zero tokens that stand in for T5
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0  # diffusers' SD3 LoRA script defaults (`--logit_mean`, `--logit_std`)


class StableDiffusion3Family(GeneratorFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    denoiser_class_name = "SD3Transformer2DModel"
    tokenizer_classes = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer"}
    text_encoder_classes = {
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
    }
    noise_scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    denoiser_target_modules = [
        *("to_q", "to_k", "to_v", "to_out.0"),  # the image stream's attention
        *("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),  # the text stream's side of the joint attention
    ]
    text_encoder_target_modules = TEXT_ENCODER_TARGET_MODULES
    pipeline_kwargs = {"text_encoder_3": None, "tokenizer_3": None}
    diffusers_lora_keys = False  # peft's keys, as diffusers' SD3 LoRA script saves them (and its loader reads)

    def encode_prompts(self, models: GeneratorModels, input_ids: torch.Tensor) -> PromptEmbeddings:
        hidden, pooled = [], []
        for ids, encoder in zip(input_ids.split(models.tokenizer_lengths(), dim=1), models.text_encoders.values()):
            output = encoder(ids.to(models.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # (B, 77, D_i)
            pooled.append(output.text_embeds)  # (B, P_i)
        clip = torch.cat(hidden, dim=-1)  # (B, 77, D1 + D2)
        width = models.denoiser.config.joint_attention_dim
        clip = F.pad(clip, (0, width - clip.shape[-1]))  # (B, 77, width), as the pipeline pads to T5's width
        t5 = clip.new_zeros(clip.shape[0], T5_SEQUENCE_LENGTH, width)  # (B, 256, width): no T5
        return PromptEmbeddings(torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1))

    def training_sigmas(self, models: GeneratorModels, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, model timesteps), each (B,), for the batch's uniform draws t ~ U{0..T-1}.

        Inverse transform sampling: t is read as the quantile (t + 0.5) / T of the logit-normal density, whose value u
        picks the scheduler's training sigma `sigmas[int(u * T)]`, as diffusers' script indexes them.
        """
        scheduler = models.noise_scheduler
        steps = scheduler.config.num_train_timesteps
        quantile = (timesteps.double().cpu() + 0.5) / steps
        u = torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.special.ndtri(quantile))
        index = (u * steps).long().clamp(max=steps - 1)
        return scheduler.sigmas[index].float(), scheduler.timesteps[index].float()

    def loss(self, models, latents, noise, timesteps, prompt_embeds):
        sigmas, model_timesteps = self.training_sigmas(models, timesteps)
        sigmas = sigmas.to(models.device, latents.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        velocity = models.denoiser(
            hidden_states=noisy,
            timestep=model_timesteps.to(models.device),
            encoder_hidden_states=prompt_embeds.hidden,
            pooled_projections=prompt_embeds.pooled,
            return_dict=False,
        )[0]
        estimate = velocity * (-sigmas) + noisy  # preconditioned: the model's x_0 estimate
        return F.mse_loss(estimate.float(), latents.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)

    def resolution_multiple(self, denoiser: torch.nn.Module, vae_scale_factor: int) -> int:
        return vae_scale_factor * denoiser.config.patch_size
