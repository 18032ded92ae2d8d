"""Stable Diffusion XL (`StableDiffusionXLPipeline`): two CLIP text encoders, a UNet conditioned on the pooled text
embedding and the `add_time_ids` micro-conditioning, epsilon or v-prediction.

Prompts are encoded as the pipeline does: the penultimate hidden states of both encoders side by side (B, T, D1 + D2)
and the second encoder's projected pooled output. The `add_time_ids` are those the pipeline samples with: original
size = target size = the training crop, crop corner (0, 0) (the images are cropped to the side; training the
condition stage 2 generates with). LoRA as diffusers' SDXL DreamBooth LoRA script places it: the UNet's attention
projections and both text encoders'.
"""

from __future__ import annotations

import torch

from ..lora import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES
from .base import GeneratorModels, PromptEmbeddings
from .sd import StableDiffusionFamily


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    tokenizer_classes = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer"}
    text_encoder_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
    denoiser_target_modules = UNET_TARGET_MODULES
    text_encoder_target_modules = TEXT_ENCODER_TARGET_MODULES
    pipeline_kwargs = {"add_watermarker": False}  # images as the model makes them; the reference adds no mark

    def encode_prompts(self, models: GeneratorModels, input_ids: torch.Tensor) -> PromptEmbeddings:
        hidden, pooled = [], None
        for ids, encoder in zip(input_ids.split(models.tokenizer_lengths(), dim=1), models.text_encoders.values()):
            output = encoder(ids.to(models.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # (B, T, D_i): the penultimate layer, as the pipeline
            pooled = getattr(output, "text_embeds", None)  # the last encoder's projection (B, P)
        return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)  # (B, T, D1 + D2)

    def predict(self, models: GeneratorModels, noisy_latents, timesteps, prompt_embeds: PromptEmbeddings):
        side = noisy_latents.shape[-1] * models.vae_scale_factor
        # (original size, crop top-left, target size), as `StableDiffusionXLPipeline._get_add_time_ids`: (B, 6)
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=prompt_embeds.hidden.dtype)
        time_ids = time_ids.to(models.device).expand(noisy_latents.shape[0], -1)
        conditions = {"text_embeds": prompt_embeds.pooled, "time_ids": time_ids}
        return models.denoiser(
            noisy_latents, timesteps, prompt_embeds.hidden, added_cond_kwargs=conditions, return_dict=False
        )[0]
