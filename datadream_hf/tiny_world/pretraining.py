"""The three pre-training phases of the tiny world, all label-free: a VAE, a CLIP trained on image-caption pairs, and
a UNet conditioned on that CLIP's text tower (as Stable Diffusion is on OpenCLIP's).

Every phase draws from its own seeded `torch.Generator` (`phase_generator`), so a rebuild is bit-exact on one CPU
thread and changing one phase's steps does not move the others. The images are the digits' train split minus the
few-shot subset (`pretraining_images`), each seen in `augmented_copies` views whose captions are recomputed from the
view's own pixels (`captions.describe_digit`), so a caption is always true of its image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from .captions import ATTRIBUTES, DigitDescription, describe_digit

logger = logging.getLogger(__name__)

# Phases of `phase_generator`: each has its own random stream.
VAE_PHASE, SCALE_PHASE, POOL_PHASE, CLIP_PHASE, UNET_PHASE = 1, 5, 6, 7, 8


def phase_generator(seed: int, phase: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100 + phase)


def batches(num_items: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches, reshuffled every epoch (the last partial batch is dropped)."""
    batch_size = min(batch_size, num_items)
    while True:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    max_rotation: float = 10.0,
    zoom: tuple[float, float] = (0.9, 1.1),
    max_shift: float = 0.1,
) -> torch.Tensor:
    """Rotates (degrees), zooms (>1 enlarges) and shifts (fraction of the side) each image at random; black fill.

    No flips: a mirrored digit is not a digit (2 and 5, say, would become the same concept).
    """
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator)
    angle = (2 * u[:, 0] - 1) * math.radians(max_rotation)
    scale = zoom[0] + u[:, 1] * (zoom[1] - zoom[0])
    shift = (2 * u[:, 2:] - 1) * max_shift * 2  # affine_grid coordinates span [-1, 1], i.e. 2 per side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (N, H, W, 2): output -> input coords
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def photometric_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Contrast, brightness and pixel noise: changes no word of an image's caption."""
    u = torch.rand(len(images), 2, 1, 1, 1, generator=generator)
    jittered = images * (0.7 + 0.6 * u[:, 0]) + (u[:, 1] - 0.5) * 0.2
    return (jittered + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0.0, 1.0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB PIL image."""
    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)


@dataclass
class CaptionedPool:
    """The pre-training images in several views, each with the description of its own pixels.

    images: (R, N, 3, 32, 32) in [0, 1]: view 0 is the image itself, views 1..R-1 small random rotations of it.
    descriptions: descriptions[r][i] describes images[r, i].
    """

    images: torch.Tensor
    descriptions: list[list[DigitDescription]]

    @classmethod
    def build(cls, images: torch.Tensor, copies: int, rotation: float, generator: torch.Generator) -> CaptionedPool:
        # Rotations only: the digits are centred and size-normalised scans, and the generator learns the views'
        # distribution. Shifted and zoomed views (+-8%, 0.9-1.1) sat at a class-mean Frechet distance of 2.2 from the
        # real test images in the tiny CLIP's features, rotated ones (+-8 deg) at 0.9, the real train images at 0.7;
        # a generator pre-trained on the shifted views sampled at 2.1.
        views = [images] + [
            random_affine(images, generator, max_rotation=rotation, zoom=(1.0, 1.0), max_shift=0.0)
            for _ in range(copies - 1)
        ]
        descriptions = [[describe_digit(to_pil(image)) for image in view] for view in views]
        return cls(torch.stack(views), descriptions)

    @property
    def num_images(self) -> int:
        return self.images.shape[1]

    def flat(self) -> tuple[torch.Tensor, list[DigitDescription]]:
        """All views as one (R * N, 3, 32, 32) batch and their descriptions, view by view."""
        return self.images.flatten(0, 1), [d for view in self.descriptions for d in view]


def sample_caption(description: DigitDescription, generator: torch.Generator, attribute_dropout: float) -> str:
    """The caption with each attribute left out with probability `attribute_dropout` (partial descriptions)."""
    keep = {name: bool(torch.rand((), generator=generator) >= attribute_dropout) for name in ATTRIBUTES}
    return description.caption(keep)


# ----------------------------------------------------------------------------------------------------------------
# Phase 1: the VAE


def train_vae(vae: AutoencoderKL, images: torch.Tensor, config) -> dict:
    """Reconstruction (MSE + L1 in [-1, 1]) plus a small KL, on lightly jittered images so the decoder also serves
    the slightly-off digits a diffusion model samples. Returns the last losses."""
    generator = phase_generator(config.seed, VAE_PHASE)
    vae.train().requires_grad_(True)
    params = list(vae.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.vae_learning_rate, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, config.vae_steps), config.vae_steps)
    stream = batches(len(images), config.vae_batch_size, generator)
    log = {}
    for step in range(config.vae_steps):
        x = random_affine(images[next(stream)], generator) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        rec_loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = rec_loss + config.vae_kl_weight * kl
        _step(loss, params, optimizer, schedule, config.max_grad_norm)
        log = {"vae_reconstruction_loss": rec_loss.item(), "vae_kl": kl.item()}
        _log_progress("vae", step, config.vae_steps, log)
    vae.eval().requires_grad_(False)
    return log


@torch.no_grad()
def encode_latent_distribution(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 128):
    """Posterior means and stds of `images` in [0, 1], each (N, 4, h, w), unscaled."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size] * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(means: torch.Tensor, stds: torch.Tensor, generator: torch.Generator) -> float:
    """1 / std of sampled latents, as SD's 0.18215 was measured, so that scaled latents have unit variance."""
    samples = means + stds * torch.randn(means.shape, generator=generator)
    return float(1.0 / samples.std())


# ----------------------------------------------------------------------------------------------------------------
# Phase 2: CLIP on image-caption pairs


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss): row i of `a` matches row i of `b`, every other row is a negative."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature  # (B, B)
    targets = torch.arange(len(a))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def clip_pixel_values(images: torch.Tensor, processor: CLIPProcessor) -> torch.Tensor:
    """Normalises (N, 3, 32, 32) images in [0, 1] with the processor's mean and std (the processor's resize and crop
    are identities at 32 px), so training sees what `processor(images=...)` gives at inference."""
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


def projection_head(dim: int, seed: int) -> torch.nn.Module:
    # SimCLR's non-linear head, discarded after training: it absorbs the view invariances, which keeps more
    # information in the CLIP projection the classifier uses.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))


def train_clip(model: CLIPModel, processor: CLIPProcessor, pool: CaptionedPool, config) -> dict:
    """CLIP's contrastive loss between a view and its caption (attributes dropped at random), plus SimCLR between two
    views of the same image. The text tower learns the caption words; no caption names a digit."""
    generator = phase_generator(config.seed, CLIP_PHASE)
    head = projection_head(model.config.projection_dim, config.seed)
    params = [*model.parameters(), *head.parameters()]
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.clip_learning_rate, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, config.clip_steps), config.clip_steps)
    stream = batches(pool.num_images, config.clip_batch_size, generator)
    copies = pool.images.shape[0]
    log = {}
    for step in range(config.clip_steps):
        index = next(stream)
        views = torch.randint(0, copies, (2, len(index)), generator=generator)  # two views of each image
        first, second = pool.images[views[0], index], pool.images[views[1], index]
        captions = [
            sample_caption(pool.descriptions[r][i], generator, config.attribute_dropout)
            for r, i in zip(views[0].tolist(), index.tolist())
        ]
        pixels = torch.cat([photometric_jitter(first, generator), photometric_jitter(second, generator)])
        image_features = model.get_image_features(pixel_values=clip_pixel_values(pixels, processor)).pooler_output
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
        text_features = model.get_text_features(**tokens).pooler_output
        first_features, second_features = image_features.chunk(2)
        caption_loss = info_nce(first_features, text_features, config.clip_temperature)
        view_loss = info_nce(head(first_features), head(second_features), config.simclr_temperature)
        _step(caption_loss + view_loss, params, optimizer, schedule, config.max_grad_norm)
        log = {"clip_caption_loss": caption_loss.item(), "clip_view_loss": view_loss.item()}
        _log_progress("clip", step, config.clip_steps, log)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(config.logit_scale))
    return log


# ----------------------------------------------------------------------------------------------------------------
# Phase 3: the UNet, conditioned on the frozen CLIP text tower


class CaptionEncoder:
    """The frozen text encoder's states of captions, tokenized as `StableDiffusionPipeline.encode_prompt` does,
    computed once per distinct caption."""

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = sorted(set(captions) - set(self.cache))
        if new:
            ids = self.pipe.tokenizer(
                new,
                padding="max_length",
                max_length=self.pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            self.cache.update(zip(new, self.pipe.text_encoder(ids)[0]))  # each (77, hidden)
        return torch.stack([self.cache[caption] for caption in captions])  # (B, 77, hidden)


def train_unet(pipe: StableDiffusionPipeline, pool: CaptionedPool, config) -> dict:
    """Epsilon-prediction MSE with the DDPM forward process of the pipeline's scheduler config (SD's recipe), on
    latents drawn from the frozen VAE's posterior of every view; each latent's caption has attributes dropped at random
    and is empty with probability `caption_dropout` (the unconditional branch of classifier-free guidance). The EMA of
    the weights is what ships."""
    generator = phase_generator(config.seed, UNET_PHASE)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    images, descriptions = pool.flat()
    means, stds = encode_latent_distribution(pipe.vae, images)
    encode = CaptionEncoder(pipe)
    unet = pipe.unet.train().requires_grad_(True)
    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.unet_learning_rate, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, min(config.unet_warmup_steps, config.unet_steps), config.unet_steps
    )
    stream = batches(len(means), config.unet_batch_size, generator)
    log = {}
    for step in range(config.unet_steps):
        index = next(stream)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        empty = (torch.rand(len(index), generator=generator) < config.caption_dropout).tolist()
        captions = [
            "" if drop else sample_caption(descriptions[i], generator, config.attribute_dropout)
            for drop, i in zip(empty, index.tolist())
        ]
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=encode(captions)).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        _step(loss, params, optimizer, schedule, config.max_grad_norm)
        decay = min(config.ema_decay, (1 + step) / (10 + step))  # warm-up of the EMA, as in diffusers' EMAModel
        with torch.no_grad():
            for shadow, param in zip(ema, params):
                shadow.lerp_(param, 1 - decay)
        log = {"unet_loss": loss.item()}
        _log_progress("unet", step, config.unet_steps, log)
    with torch.no_grad():
        for shadow, param in zip(ema, params):
            param.copy_(shadow)
    unet.eval().requires_grad_(False)
    return log


def _step(loss, params: list, optimizer, schedule, max_grad_norm: float) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def _log_progress(phase: str, step: int, total: int, log: dict) -> None:
    if step % 250 == 0 or step == total - 1:
        logger.info("%s step %d/%d: %s", phase, step + 1, total, ", ".join(f"{k}={v:.4f}" for k, v in log.items()))


def caption_statistics(pool: CaptionedPool) -> dict:
    """How often each caption word occurs in the full captions of view 0 (for the card)."""
    words: dict[str, int] = {}
    for description in pool.descriptions[0]:
        for word in set(description.caption().replace(",", " ").split()):
            words[word] = words.get(word, 0) + 1
    total = len(pool.descriptions[0])
    return {"num_images": total, "word_share": {w: round(c / total, 3) for w, c in sorted(words.items())}}


def unique_captions(pool: CaptionedPool) -> int:
    return len({d.caption() for view in pool.descriptions for d in view})
