"""What a stage-1 run shows while it trains: each adapter's validation samples (a grid, and TensorBoard), and, in a
multi-process cls run, the other processes' classes replayed into the main process's TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..files import save_png_atomic
from ..grids import chunk, image_grid
from .data import seeded_generator
from .outputs import SAMPLES_NAME, TRAINING_LOG_NAME

if TYPE_CHECKING:
    from .config import GeneratorTrainingConfig
    from .modeling import GeneratorModels

logger = logging.getLogger(__name__)


@torch.no_grad()
def log_validation(models: GeneratorModels, unit, config: GeneratorTrainingConfig, class_names, accelerator) -> Path:
    """Samples `num_validation_images` with the freshly trained adapter, saves a grid and logs it to TensorBoard."""
    family = models.family
    pipeline = family.pipeline_class().from_pretrained(
        config.pretrained_model_name_or_path,
        revision=config.revision,
        **models.lora_components(),
        vae=models.vae,
        **dict(zip(family.tokenizer_classes, models.tokenizers)),
        **family.pipeline_kwargs,
        feature_extractor=None,
        use_safetensors=True,
    )  # only the sampling scheduler is read from disk; the trained modules are reused
    pipeline.set_progress_bar_config(disable=True)
    template = config.prompt_template()
    class_prompts = [template(class_names[i]) for i in sorted(set(unit.class_indices))]
    for model in models.lora_components().values():
        model.eval()
    images = []
    for i in range(config.num_validation_images):
        prompt = config.validation_prompt or class_prompts[i % len(class_prompts)]
        output = pipeline(
            prompt,
            height=config.resolution,
            width=config.resolution,
            num_inference_steps=config.validation_num_inference_steps,
            generator=seeded_generator(unit.seed, 3, i),
        )
        images.append(output.images[0])
    for model in models.lora_components().values():
        model.train()
    folder = Path(config.output_dir) / unit.folder
    path = save_png_atomic(image_grid(chunk(images, 4)), folder / SAMPLES_NAME)
    tag = "validation" if config.mode == "dset" else f"{unit.folder}/validation"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])  # (N, H, W, 3)
            tracker.writer.add_images(tag, stacked, 0, dataformats="NHWC")
    return path


def replay_to_trackers(output_dir: Path, folders: list[str], accelerator) -> None:
    """Writes what other processes made for `folders` (their adapters) into the main process's TensorBoard, under
    the tags their own process would have used: each training log's loss and lr, and the validation grid.

    Trackers live on the main process only. TensorBoard takes steps in any order; a tracker that needs increasing
    steps (wandb) is left alone: those classes' curves are in their `training_log.json`.
    """
    boards = [tracker.writer for tracker in accelerator.trackers if tracker.name == "tensorboard"]
    others = [tracker.name for tracker in accelerator.trackers if tracker.name != "tensorboard"]
    if others:
        logger.info("Trackers %s get only the main process's classes; see each class's %s.", others, TRAINING_LOG_NAME)
    for folder in folders:
        path = Path(output_dir) / folder / TRAINING_LOG_NAME
        if not path.is_file():  # an adapter written before training logs existed
            logger.warning("No %s in %s: its curves are not in the trackers.", TRAINING_LOG_NAME, path.parent)
            continue
        with open(path) as f:
            entries = json.load(f)["log_history"]
        samples = Path(output_dir) / folder / SAMPLES_NAME
        grid = np.asarray(Image.open(samples).convert("RGB")) if samples.is_file() else None  # (H, W, 3)
        for board in boards:
            for entry in entries:
                board.add_scalar(f"{folder}/loss", entry["loss"], entry["step"])
                board.add_scalar(f"{folder}/lr", entry["lr"], entry["step"])
            if grid is not None:
                board.add_image(f"{folder}/validation", grid, 0, dataformats="HWC")
            board.flush()
