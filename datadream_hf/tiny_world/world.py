"""The tiny world: a text-to-image latent diffusion model and a CLIP backbone pre-trained here, on digits, without
class labels, with captions that describe each image but never name its digit.

DataDream assumes a generator that follows prompts about what it knows but does not know the few-shot classes (Stable
Diffusion draws "a high-wing propeller airplane" but not a "DHC-3-800"), and a classifier backbone with features worth
adapting. `pretrain_tiny_world` makes both, deterministically on one CPU thread, from the bundled digits' train split
minus the K-shot subset: a CLIP trained on image-caption pairs (`captions.describe_digit`), whose text tower becomes
the generator's frozen text encoder, and a UNet conditioned on it (`pretraining`). The weights ship in
`datadream_hf/assets/tiny_world/` (see its README.md) and `tiny_world_paths()` finds them.
"""

from __future__ import annotations

import logging
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
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel

from ..data import decode_images
from ..few_shot import FewShotManifest, draw_few_shot
from ..files import write_json_atomic, write_text_atomic
from ..testing import TINY_IMAGE_SIZE, TINY_VOCAB_WORDS, build_tiny_clip
from ..versions import library_versions
from . import captions
from .digits import load_digits_dataset
from .pretraining import (
    POOL_PHASE,
    SCALE_PHASE,
    CaptionedPool,
    caption_statistics,
    encode_latent_distribution,
    latent_scaling_factor,
    phase_generator,
    train_clip,
    train_unet,
    train_vae,
    unique_captions,
)

logger = logging.getLogger(__name__)

TINY_WORLD_ASSETS = "assets/tiny_world"
TINY_WORLD_METADATA_NAME = "tiny_world.json"
REBUILD_COMMAND = (
    "OMP_NUM_THREADS=1 python training_scripts/pretrain_tiny_world.py --output_dir datadream_hf/assets/tiny_world"
)
# The tokenizer's whole words: the test vocabulary (digit names and domain words among them) and the caption words.
TINY_WORLD_WORDS = tuple(dict.fromkeys([*TINY_VOCAB_WORDS, *captions.CAPTION_WORDS]))


@dataclass
class TinyWorldConfig:
    """Everything that decides the tiny world's weights; stored next to them in `tiny_world.json`."""

    seed: int = field(default=0, metadata={"help": "Seed of every initialisation, batch order and noise draw."})
    shots: int = field(default=16, metadata={"help": "K of the few-shot subset held out of pre-training."})
    few_shot_seed: int = field(default=0, metadata={"help": "Seed of that subset (`draw_few_shot(train, K, seed)`)."})
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads (1: no oversubscription on a shared CPU, order-stable sums)."}
    )
    augmented_copies: int = field(
        default=8,
        metadata={"help": "Views of each image (the image and random rotations), each captioned from its pixels."},
    )
    view_rotation: float = field(default=6.0, metadata={"help": "Largest rotation of a view, in degrees."})
    attribute_dropout: float = field(
        default=0.25, metadata={"help": "Chance that a caption leaves out each attribute (partial descriptions)."}
    )
    # Phase 1: the VAE. Small KL weight: the latents only need to be smooth enough for diffusion, as in SD.
    vae_steps: int = field(default=500, metadata={"help": "VAE optimisation steps."})
    vae_batch_size: int = field(default=16, metadata={"help": "VAE images per step."})
    vae_learning_rate: float = field(default=1e-3, metadata={"help": "VAE AdamW peak learning rate (cosine)."})
    vae_kl_weight: float = field(default=1e-3, metadata={"help": "Weight of the per-element KL to N(0, 1)."})
    # Phase 2: CLIP on image-caption pairs (+ SimCLR between two views).
    clip_steps: int = field(default=1500, metadata={"help": "CLIP optimisation steps."})
    clip_batch_size: int = field(default=256, metadata={"help": "Images (two views each) and captions per batch."})
    clip_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate of both towers."})
    clip_temperature: float = field(default=0.1, metadata={"help": "InfoNCE temperature of image vs caption."})
    simclr_temperature: float = field(default=0.2, metadata={"help": "InfoNCE temperature of view vs view."})
    # Not OpenAI CLIP's trained 100: the class-prompt head of a digit name starts unaligned with the image features,
    # and at 100 the first cross-entropies are ~20 and a 16-shot LoRA learns far slower.
    logit_scale: float = field(
        default=1 / 0.07, metadata={"help": "CLIP logit scale stored in the model (CLIP's initial 1/0.07)."}
    )
    # Phase 3: the UNet (epsilon prediction, DDPM noise schedule of the scheduler config), on CLIP's text tower.
    unet_steps: int = field(default=4000, metadata={"help": "UNet optimisation steps."})
    unet_batch_size: int = field(default=64, metadata={"help": "UNet latents per step."})
    unet_learning_rate: float = field(default=1e-3, metadata={"help": "UNet AdamW peak learning rate (cosine)."})
    unet_warmup_steps: int = field(default=200, metadata={"help": "Linear warmup steps of the UNet schedule."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the UNet weights; the EMA weights ship."})
    caption_dropout: float = field(
        default=0.1, metadata={"help": "Share of empty captions, so the unconditional branch of CFG is trained."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of every phase."})

    def __post_init__(self):
        positive_ints = ("shots", "num_threads", "augmented_copies", "vae_batch_size", "clip_batch_size",
                         "unet_batch_size")  # fmt: skip
        for name in positive_ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        for name in ("vae_steps", "clip_steps", "unet_steps", "unet_warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {getattr(self, name)!r}.")
        for name in ("vae_learning_rate", "clip_learning_rate", "unet_learning_rate", "clip_temperature",
                     "simclr_temperature", "logit_scale", "max_grad_norm"):  # fmt: skip
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
        if not (isinstance(self.view_rotation, (int, float)) and 0.0 <= self.view_rotation <= 45.0):
            raise ValueError(f"`view_rotation` must be in [0, 45] degrees, got {self.view_rotation!r}.")
        for name in ("ema_decay", "caption_dropout", "attribute_dropout", "vae_kl_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


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


def pretraining_images(config: TinyWorldConfig) -> tuple[torch.Tensor, FewShotManifest]:
    """The digits train split minus its K-shot subset, as a (N, 3, 32, 32) float tensor in [0, 1], and that subset.

    Only the image column is read: labels are needed to draw the subset (as every stage does), never for training.
    """
    train = load_digits_dataset()["train"]
    manifest = draw_few_shot(train, k=config.shots, seed=config.few_shot_seed, source_name="digits", split="train")
    rest = manifest.complement(train).select_columns(["image"])
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in decode_images(rest)])  # (N, H, W, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0, manifest  # (N, 3, H, W)


def build_tiny_world_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """The tiny CLIP of `testing.build_tiny_clip` (ViT 32 px, patch 8, width 32) with the caption words in its
    tokenizer; random weights."""
    return build_tiny_clip(seed, words=TINY_WORLD_WORDS)


def build_tiny_world_generator(clip: CLIPModel, processor: CLIPProcessor, seed: int = 0) -> StableDiffusionPipeline:
    """A 32 px latent diffusion pipeline whose text encoder and tokenizer are `clip`'s text tower and tokenizer.

    The UNet is `testing.build_tiny_stable_diffusion`'s ((32, 64) channels, cross-attention at the coarser level,
    linear projections as in SD 2.x); the VAE has three levels (32, 64, 64 channels), so 32 px images get 8x8x4
    latents (SD: 512 px -> 64x64x4), which fits the 8x8 digits; the scheduler is SD 2.1-base's PNDM config.
    """
    from ..testing import build_tiny_stable_diffusion

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
    unet = UNet2DConditionModel.from_config(
        base.unet.config, sample_size=TINY_IMAGE_SIZE // 4, cross_attention_dim=clip.config.text_config.hidden_size
    )
    text_encoder = CLIPTextModel(clip.config.text_config)
    tower = {
        name.removeprefix("text_model."): p for name, p in clip.state_dict().items() if name.startswith("text_model.")
    }
    text_encoder.load_state_dict(tower, strict=True)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval().requires_grad_(False),
        tokenizer=processor.tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(base.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def pretrain_tiny_world(output_dir: str | os.PathLike, config: TinyWorldConfig | None = None) -> dict:
    """Pre-trains the CLIP backbone and the generator and writes `output_dir/{generator,clip}`, `tiny_world.json`
    and a `README.md` card. The folder is built aside and swapped in at the end: an interrupted run leaves the old
    one intact. Returns the metadata written to `tiny_world.json`."""
    config = config or TinyWorldConfig()
    output_dir = Path(output_dir)
    torch.set_num_threads(config.num_threads)
    timings, losses = {}, {}

    # 1. The label-free data: images minus the few shots, each in several views captioned from its own pixels.
    start = time.perf_counter()
    images, manifest = pretraining_images(config)
    pool = CaptionedPool.build(
        images, config.augmented_copies, config.view_rotation, phase_generator(config.seed, POOL_PHASE)
    )
    logger.info("pre-training on %d digits x %d views (K=%d shots/class held out); e.g. %r", len(images),
                config.augmented_copies, config.shots, pool.descriptions[0][0].caption())  # fmt: skip
    timings["captions_s"] = time.perf_counter() - start

    # 2. CLIP on image-caption pairs; its text tower becomes the generator's frozen text encoder.
    tic = time.perf_counter()
    clip, processor = build_tiny_world_clip(config.seed)
    losses |= train_clip(clip, processor, pool, config)
    pipe = build_tiny_world_generator(clip, processor, config.seed)
    timings["clip_s"] = time.perf_counter() - tic

    # 3. The VAE, and its latent scale measured as SD measured its 0.18215.
    tic = time.perf_counter()
    losses |= train_vae(pipe.vae, images, config)
    means, stds = encode_latent_distribution(pipe.vae, images)
    scaling_factor = latent_scaling_factor(means, stds, phase_generator(config.seed, SCALE_PHASE))
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    timings["vae_s"] = time.perf_counter() - tic

    # 4. The UNet, conditioned on the captions through the frozen text encoder.
    tic = time.perf_counter()
    losses |= train_unet(pipe, pool, config)
    timings["unet_s"] = time.perf_counter() - tic
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
        "captions": {
            "words": list(captions.CAPTION_WORDS),
            "example": pool.descriptions[0][0].caption(),
            "distinct_captions": unique_captions(pool),
            **caption_statistics(pool),
        },
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
