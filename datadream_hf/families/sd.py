"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`): one CLIP text encoder, a UNet, epsilon or v-prediction.

The paper's generator (SD 2.1-base). Stage 1 as the reference `datadream.py`: DDPM noising at t ~ U[0, T), the MSE
between the UNet's prediction and the noise (or the velocity for v-prediction), no SNR weighting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lora import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES
from .base import GeneratorFamily, GeneratorModels, PromptEmbeddings

PREDICTION_TYPES = ("epsilon", "v_prediction")


class StableDiffusionFamily(GeneratorFamily):
    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_target_modules = UNET_TARGET_MODULES
    text_encoder_target_modules = TEXT_ENCODER_TARGET_MODULES
    # No safety checker, as the reference.
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def check_noise_scheduler(self, noise_scheduler, path: str) -> None:
        if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"{path!r}: scheduler prediction_type {noise_scheduler.config.prediction_type!r} is not supported; "
                "stage 1 trains 'epsilon' or 'v_prediction' models."
            )

    def encode_prompts(self, models: GeneratorModels, input_ids: torch.Tensor) -> PromptEmbeddings:
        # The text encoder's last hidden states, as `StableDiffusionPipeline.encode_prompt` (no clip skip).
        return PromptEmbeddings(models.text_encoder(input_ids.to(models.device), return_dict=False)[0])

    def predict(self, models: GeneratorModels, noisy_latents, timesteps, prompt_embeds: PromptEmbeddings):
        return models.denoiser(noisy_latents, timesteps, prompt_embeds.hidden, return_dict=False)[0]

    def loss(self, models, latents, noise, timesteps, prompt_embeds):
        noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self.predict(models, noisy_latents, timesteps, prompt_embeds)
        if models.noise_scheduler.config.prediction_type == "v_prediction":
            target = models.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
