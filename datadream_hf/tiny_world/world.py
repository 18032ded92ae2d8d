"""The tiny world: a latent diffusion model and a CLIP backbone pre-trained here, on digits, without class labels.

DataDream assumes a generator that knows the domain but not the few-shot classes (SD knows airplanes, not DHC-3-800s)
and a classifier backbone with features worth adapting. `pretrain_tiny_world` makes both, deterministically on CPU,
from the bundled digits' train split minus the K-shot subset, with class-agnostic captions; the weights ship in
`datadream_hf/assets/tiny_world/` (see its README.md) and `tiny_world_paths()` finds them.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from transformers import CLIPModel, CLIPProcessor

from ..data import decode_images
from ..few_shot import FewShotManifest, draw_few_shot
from ..files import write_json_atomic, write_text_atomic
from ..testing import TINY_IMAGE_SIZE, TINY_VOCAB_WORDS, build_tiny_clip, build_tiny_stable_diffusion
from ..versions import library_versions
from .digits import load_digits_dataset

logger = logging.getLogger(__name__)

TINY_WORLD_ASSETS = "assets/tiny_world"
TINY_WORLD_METADATA_NAME = "tiny_world.json"
REBUILD_COMMAND = (
    "OMP_NUM_THREADS=1 python training_scripts/pretrain_tiny_world.py --output_dir datadream_hf/assets/tiny_world"
)

# Class-agnostic captions: every word is a whole token of the tiny tokenizer, and none names a digit class.
CAPTION_TEMPLATES = (
    "a photo of a digit",
    "a picture of a digit",
    "an image of a digit",
    "a photo of a handwritten digit",
    "a picture of a handwritten number",
    "an image of a handwritten number",
    "a photo of a number",
    "a handwritten digit",
)
# Paraphrases for the text tower's label-free objective: the same word in two templates is a positive pair.
TEXT_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a photo of the {}",
    "a picture of the {}",
    "a handwritten {}",
    "the {}",
    "a {}",
    "{}",
)


@dataclass
class TinyWorldConfig:
    """Everything that decides the tiny world's weights; stored next to them in `tiny_world.json`."""

    seed: int = field(default=0, metadata={"help": "Seed of every initialisation, batch order and noise draw."})
    shots: int = field(default=16, metadata={"help": "K of the few-shot subset held out of pre-training."})
    few_shot_seed: int = field(default=0, metadata={"help": "Seed of that subset (`draw_few_shot(train, K, seed)`)."})
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads (1: no oversubscription on a shared CPU, order-stable sums)."}
    )
    # Stage a1: the VAE. Small KL weight: the latents only need to be smooth enough for diffusion, as in SD.
    vae_steps: int = field(default=500, metadata={"help": "VAE optimisation steps."})
    vae_batch_size: int = field(default=16, metadata={"help": "VAE images per step."})
    vae_learning_rate: float = field(default=1e-3, metadata={"help": "VAE AdamW peak learning rate (cosine)."})
    vae_kl_weight: float = field(default=1e-3, metadata={"help": "Weight of the per-element KL to N(0, 1)."})
    # Stage a2: the UNet (epsilon prediction, DDPM noise schedule of the scheduler config).
    unet_steps: int = field(default=1500, metadata={"help": "UNet optimisation steps."})
    unet_batch_size: int = field(default=64, metadata={"help": "UNet latents per step."})
    unet_learning_rate: float = field(default=1e-3, metadata={"help": "UNet AdamW peak learning rate (cosine)."})
    unet_warmup_steps: int = field(default=200, metadata={"help": "Linear warmup steps of the UNet schedule."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the UNet weights; the EMA weights ship."})
    caption_dropout: float = field(
        default=0.1, metadata={"help": "Share of empty captions, so the unconditional branch of CFG is trained."}
    )
    # Stage b: the CLIP backbone (image tower: SimCLR on augmented views; text tower: paraphrase contrastive).
    clip_image_steps: int = field(default=1500, metadata={"help": "SimCLR steps of the image tower."})
    clip_text_steps: int = field(default=300, metadata={"help": "Paraphrase-contrastive steps of the text tower."})
    clip_batch_size: int = field(default=256, metadata={"help": "Images (two views each) or words per batch."})
    clip_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate of both towers."})
    clip_temperature: float = field(default=0.2, metadata={"help": "InfoNCE temperature of both towers."})
    # Not OpenAI CLIP's trained 100: here the class-prompt head starts unaligned with the image features, and at 100
    # the first cross-entropies are ~20 and a 16-shot LoRA learns far slower (measured, see the card).
    logit_scale: float = field(
        default=1 / 0.07, metadata={"help": "CLIP logit scale stored in the model (CLIP's initial 1/0.07)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of every phase."})

    def __post_init__(self):
        positive_ints = ("shots", "num_threads", "vae_batch_size", "unet_batch_size", "clip_batch_size")
        for name in positive_ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        for name in ("vae_steps", "unet_steps", "unet_warmup_steps", "clip_image_steps", "clip_text_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {getattr(self, name)!r}.")
        for name in ("vae_learning_rate", "unet_learning_rate", "clip_learning_rate", "clip_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay!r}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"`caption_dropout` must be in [0, 1), got {self.caption_dropout!r}.")
        if not self.logit_scale > 0:
            raise ValueError(f"`logit_scale` must be > 0, got {self.logit_scale!r}.")


class TinyWorldPaths(NamedTuple):
    generator: Path
    clip: Path


def tiny_world_paths() -> TinyWorldPaths:
    """The shipped generator (a `StableDiffusionPipeline` folder) and CLIP (`CLIPModel` + `CLIPProcessor`) folders."""
    root = Path(str(resources.files("datadream_hf").joinpath(TINY_WORLD_ASSETS)))
    paths = TinyWorldPaths(generator=root / "generator", clip=root / "clip")
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(
                f"The tiny world's weights are missing at {str(path)!r}; rebuild them with `{REBUILD_COMMAND}`."
            )
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Data


def pretraining_images(config: TinyWorldConfig) -> tuple[torch.Tensor, FewShotManifest]:
    """The digits train split minus its K-shot subset, as a (N, 3, 32, 32) float tensor in [0, 1], and that subset."""
    train = load_digits_dataset()["train"]
    manifest = draw_few_shot(train, k=config.shots, seed=config.few_shot_seed, source_name="digits", split="train")
    rest = manifest.complement(train)
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in decode_images(rest)])  # (N, H, W, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0, manifest  # (N, 3, H, W)


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


def simclr_view(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR view of images in [0, 1]: crop-like zoom, rotation, shift, contrast/brightness jitter, noise."""
    n = images.shape[0]
    views = random_affine(images, generator, max_rotation=15.0, zoom=(0.85, 1.35), max_shift=0.12)
    u = torch.rand(n, 2, 1, 1, 1, generator=generator)
    views = views * (0.6 + 0.8 * u[:, 0]) + (u[:, 1] - 0.5) * 0.4
    views = views + 0.05 * torch.randn(views.shape, generator=generator)
    return views.clamp(0.0, 1.0)


def _batches(num_items: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches, reshuffled every epoch (the last partial batch is dropped)."""
    batch_size = min(batch_size, num_items)
    while True:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _generator(config: TinyWorldConfig, phase: int) -> torch.Generator:
    # One independent stream per phase, so changing the steps of one phase does not move the others.
    return torch.Generator().manual_seed(config.seed * 100 + phase)


# ----------------------------------------------------------------------------------------------------------------
# Architectures


def build_tiny_world_generator(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny SD of `testing.build_tiny_stable_diffusion` (same UNet, text encoder, tokenizer, PNDM scheduler),
    with a VAE of three levels instead of two: 32 px images get 8x8x4 latents (SD: 512 px -> 64x64x4), which fits the
    8x8 digits and makes each UNet step ~4x cheaper on CPU."""
    base = build_tiny_stable_diffusion(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        sample_size=TINY_IMAGE_SIZE,
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(base.unet.config, sample_size=TINY_IMAGE_SIZE // 4)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny_world_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """The tiny CLIP of `testing.build_tiny_clip` (ViT 32 px, patch 8, width 32), random weights."""
    return build_tiny_clip(seed)


# ----------------------------------------------------------------------------------------------------------------
# Stage a1: the VAE


def train_vae(vae: AutoencoderKL, images: torch.Tensor, config: TinyWorldConfig) -> dict:
    """Reconstruction (MSE + L1 in [-1, 1]) plus a small KL, on lightly jittered images so the decoder also serves
    the slightly-off digits a diffusion model samples. Returns the last losses."""
    generator = _generator(config, phase=1)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=1e-4)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, config.vae_steps), config.vae_steps)
    batches = _batches(len(images), config.vae_batch_size, generator)
    log = {}
    for step in range(config.vae_steps):
        x = random_affine(images[next(batches)], generator) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        rec_loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = rec_loss + config.vae_kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log = {"vae_reconstruction_loss": rec_loss.item(), "vae_kl": kl.item()}
        if step % 100 == 0 or step == config.vae_steps - 1:
            logger.info("vae step %d/%d: %s", step + 1, config.vae_steps, _fmt(log))
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
# Stage a2: the UNet


@torch.no_grad()
def encode_captions(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    """Frozen text-encoder states of `captions`, tokenised exactly as `StableDiffusionPipeline.encode_prompt` does."""
    ids = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pipe.text_encoder(ids)[0]  # (num_captions, 77, hidden)


def train_unet(
    pipe: StableDiffusionPipeline, means: torch.Tensor, stds: torch.Tensor, config: TinyWorldConfig
) -> dict:
    """Epsilon-prediction MSE with the DDPM forward process of the pipeline's scheduler config (SD's training recipe),
    on latents drawn from the frozen VAE posterior; captions are class-agnostic templates or, with probability
    `caption_dropout`, empty. The text encoder stays frozen (see the card). Loads the EMA weights into the UNet."""
    generator = _generator(config, phase=2)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scale = pipe.vae.config.scaling_factor
    captions = [""] + list(CAPTION_TEMPLATES)
    caption_states = encode_captions(pipe, captions)  # the text encoder is frozen: encode each caption once
    unet = pipe.unet.train().requires_grad_(True)
    ema = [p.detach().clone() for p in unet.parameters()]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_learning_rate, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, min(config.unet_warmup_steps, config.unet_steps), config.unet_steps
    )
    batches = _batches(len(means), config.unet_batch_size, generator)
    log = {}
    for step in range(config.unet_steps):
        idx = next(batches)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        empty = torch.rand(len(idx), generator=generator) < config.caption_dropout
        which = torch.randint(1, len(captions), (len(idx),), generator=generator).masked_fill(empty, 0)
        pred = unet(noisy, timesteps, encoder_hidden_states=caption_states[which]).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(config.ema_decay, (1 + step) / (10 + step))  # warm-up of the EMA, as in diffusers' EMAModel
        with torch.no_grad():
            for shadow, param in zip(ema, unet.parameters()):
                shadow.lerp_(param, 1 - decay)
        log = {"unet_loss": loss.item()}
        if step % 250 == 0 or step == config.unet_steps - 1:
            logger.info("unet step %d/%d: %s", step + 1, config.unet_steps, _fmt(log))
    with torch.no_grad():
        for shadow, param in zip(ema, unet.parameters()):
            param.copy_(shadow)
    unet.eval().requires_grad_(False)
    return log


# ----------------------------------------------------------------------------------------------------------------
# Stage b: the CLIP backbone


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (SimCLR's NT-Xent with the other view's batch as negatives): row i of `a` matches row i of
    `b`."""
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


def _projection_head(dim: int, seed: int) -> torch.nn.Module:
    # SimCLR's non-linear head, discarded after training: it absorbs the augmentation invariances, which keeps more
    # information in the CLIP projection the classifier uses.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))


def train_clip_image_tower(
    model: CLIPModel, processor: CLIPProcessor, images: torch.Tensor, config: TinyWorldConfig
) -> dict:
    """SimCLR on the unlabelled images: two random views of an image are a positive pair, all others negatives."""
    generator = _generator(config, phase=3)
    head = _projection_head(model.config.projection_dim, config.seed)
    params = [*model.vision_model.parameters(), *model.visual_projection.parameters(), *head.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.clip_learning_rate, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, config.clip_image_steps), config.clip_image_steps)
    batches = _batches(len(images), config.clip_batch_size, generator)
    model.train()
    log = {}
    for step in range(config.clip_image_steps):
        batch = images[next(batches)]
        views = torch.cat([simclr_view(batch, generator), simclr_view(batch, generator)])
        features = head(model.get_image_features(pixel_values=clip_pixel_values(views, processor)).pooler_output)
        loss = info_nce(*features.chunk(2), config.clip_temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log = {"clip_image_loss": loss.item()}
        if step % 100 == 0 or step == config.clip_image_steps - 1:
            logger.info("clip image step %d/%d: %s", step + 1, config.clip_image_steps, _fmt(log))
    model.eval().requires_grad_(False)
    return log


def text_word_pool(seed: int, num_pseudo_words: int = 400) -> list[str]:
    """The tokenizer's whole words plus seeded pseudo-words; the ten digit names are words like any other here."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    pseudo = {"".join(rng.choice(letters, size=rng.integers(3, 8))) for _ in range(num_pseudo_words)}
    return list(TINY_VOCAB_WORDS) + sorted(pseudo - set(TINY_VOCAB_WORDS))


def train_clip_text_tower(model: CLIPModel, processor: CLIPProcessor, config: TinyWorldConfig) -> dict:
    """Label-free text objective: a word in two paraphrase templates is a positive pair, other words are negatives.

    A random text tower maps "a photo of a zero" and "a photo of a one" to nearly the same vector (cosine ~0.98); after
    this, prompts that differ in their content word point in different directions, which a classifier head made of
    class-prompt embeddings needs. No image is seen, so no word is tied to any digit.
    """
    generator = _generator(config, phase=4)
    words = text_word_pool(config.seed)
    params = [*model.text_model.parameters(), *model.text_projection.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.clip_learning_rate, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, config.clip_text_steps), config.clip_text_steps)
    batches = _batches(len(words), min(config.clip_batch_size, len(words)), generator)
    model.train()
    log = {}
    for step in range(config.clip_text_steps):
        batch = [words[i] for i in next(batches).tolist()]
        pick = torch.randint(0, len(TEXT_TEMPLATES), (2, len(batch)), generator=generator).tolist()
        views = [TEXT_TEMPLATES[t].format(w) for row in pick for t, w in zip(row, batch)]
        tokens = processor.tokenizer(views, padding=True, return_tensors="pt")
        features = model.get_text_features(**tokens).pooler_output
        loss = info_nce(*features.chunk(2), config.clip_temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log = {"clip_text_loss": loss.item()}
        if step % 100 == 0 or step == config.clip_text_steps - 1:
            logger.info("clip text step %d/%d: %s", step + 1, config.clip_text_steps, _fmt(log))
    model.eval().requires_grad_(False)
    return log


# ----------------------------------------------------------------------------------------------------------------
# The whole rebuild


def pretrain_tiny_world(output_dir: str | os.PathLike, config: TinyWorldConfig | None = None) -> dict:
    """Pre-trains the generator and the CLIP backbone and writes `output_dir/{generator,clip}`, `tiny_world.json`
    and a `README.md` card. The folder is built aside and swapped in at the end: an interrupted run leaves the old
    one intact. Returns the metadata written to `tiny_world.json`."""
    config = config or TinyWorldConfig()
    output_dir = Path(output_dir)
    torch.set_num_threads(config.num_threads)
    timings, losses = {}, {}

    start = time.perf_counter()
    images, manifest = pretraining_images(config)
    logger.info("pre-training on %d digits (K=%d shots/class held out)", len(images), config.shots)

    tic = time.perf_counter()
    pipe = build_tiny_world_generator(config.seed)
    pipe.text_encoder.requires_grad_(False)
    losses |= train_vae(pipe.vae, images, config)
    means, stds = encode_latent_distribution(pipe.vae, images)
    scaling_factor = latent_scaling_factor(means, stds, _generator(config, phase=5))
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    timings["vae_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    losses |= train_unet(pipe, means, stds, config)
    timings["unet_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    clip, processor = build_tiny_world_clip(config.seed)
    losses |= train_clip_image_tower(clip, processor, images, config)
    losses |= train_clip_text_tower(clip, processor, config)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(config.logit_scale))
    timings["clip_s"] = time.perf_counter() - tic
    timings["total_s"] = time.perf_counter() - start

    metadata = {
        "config": asdict(config),
        "data": {
            "source": "sklearn.datasets.load_digits via datadream_hf.tiny_world.digits.load_digits_dataset()['train']",
            "num_pretraining_images": len(images),
            "held_out_few_shot": {
                "k": manifest.k,
                "seed": manifest.seed,
                "fingerprint": manifest.source["fingerprint"],
                "indices": manifest.indices,
            },
        },
        "captions": {"templates": list(CAPTION_TEMPLATES), "empty_caption_probability": config.caption_dropout},
        "vae_scaling_factor": scaling_factor,
        "final_losses": {k: round(v, 5) for k, v in losses.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "rebuild_command": REBUILD_COMMAND,
        "versions": library_versions(),
    }
    _write_atomically(output_dir, pipe, clip, processor, metadata)
    return metadata


def render_tiny_world_card(root: str | os.PathLike, metadata: dict) -> Path:
    """(Re)writes `root/README.md` from `model_cards/tiny_world_card.md` and the metadata of `tiny_world.json`."""
    from ..cards import render_card

    path = Path(root) / "README.md"
    write_text_atomic(path, render_card("tiny_world_card.md", **metadata))
    return path


def _write_atomically(output_dir: Path, pipe, clip, processor, metadata: dict) -> None:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private (0700); the folder ships in the package
    try:
        pipe.save_pretrained(staging / "generator", safe_serialization=True)
        clip.save_pretrained(staging / "clip", safe_serialization=True)
        processor.save_pretrained(staging / "clip")
        write_json_atomic(staging / TINY_WORLD_METADATA_NAME, metadata)
        render_tiny_world_card(staging, metadata)
        for path in staging.rglob("*"):  # safetensors writes private (0600) files; the folder ships in the package
            path.chmod(0o755 if path.is_dir() else 0o644)
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output_dir, old)
            os.replace(staging, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fmt(log: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in log.items())
