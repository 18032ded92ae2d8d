"""The stage-2 generation loop: this process's share of the shards, each sampled class by class and written (PNG
encoding and the atomic shard write) on a background thread while the next one is sampled."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from ..synthetic import Shard, write_shard
from .sampling import SyntheticImageSampler, image_seed

logger = logging.getLogger(__name__)


def encode_png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def split_work(shards: list[Shard], num_processes: int, process_index: int) -> list[Shard]:
    """This process's contiguous share of the (class-ordered) shards: few adapter switches per process."""
    bounds = np.linspace(0, len(shards), num_processes + 1).round().astype(int)
    return shards[bounds[process_index] : bounds[process_index + 1]]


def generate_shards(
    sampler: SyntheticImageSampler,
    output_dir: str | Path,
    shards: list[Shard],
    run_fingerprint: str,
    show_progress: bool = True,
    on_shard_written: Callable[[Shard, Path], None] | None = None,
) -> None:
    """Generates and writes `shards` in order, with an overall and a per-class progress bar (images/s) on a terminal,
    a log line per written shard elsewhere."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        _generate_shards(sampler, output_dir, shards, run_fingerprint, show_progress, on_shard_written, writer)


def _encode_and_write_shard(output_dir, shard: Shard, names, rows: dict, images, run_fingerprint: str) -> Path:
    rows = {**rows, "image": [encode_png(image) for image in images]}
    return write_shard(output_dir, shard, names, rows, run_fingerprint)


def _generate_shards(sampler, output_dir, shards, run_fingerprint, show_progress, on_shard_written, writer) -> None:
    from tqdm.auto import tqdm

    def finish(shard: Shard, written: Future) -> None:
        path = written.result()  # re-raises a failed write here, in the main thread
        if show_progress and overall.disable:  # no terminal, no bars: a line per shard instead
            logger.info(f"Wrote {path.parent.name}/{path.name} ({shard.num_images} images).")
        if on_shard_written is not None:
            on_shard_written(shard, path)

    names = sampler.adapters.class_names
    disable = None if show_progress else True  # None: tqdm shows bars only on a terminal
    overall = tqdm(total=sum(s.num_images for s in shards), unit="img", desc="images", disable=disable)
    class_bar, current, pending = None, None, None
    for shard in shards:
        if shard.class_index != current:
            if class_bar is not None:
                class_bar.close()
            current = shard.class_index
            class_bar = tqdm(
                total=sum(s.num_images for s in shards if s.class_index == current),
                unit="img",
                leave=False,
                desc=f"class {current} ({names[current]})",
                position=1,
                disable=disable,
            )

        def advance(n, class_bar=class_bar):
            class_bar.update(n)
            overall.update(n)

        indices = list(range(shard.start, shard.end))
        images = sampler.sample(shard.class_index, indices, on_batch=advance)
        rows = {
            "label": [shard.class_index] * len(indices),
            "image_index": indices,
            "seed": [image_seed(sampler.config.seed, shard.class_index, k) for k in indices],
            "prompt": [sampler.prompts[shard.class_index]] * len(indices),
        }
        if sampler.fusion is not None:
            rows.update(sampler.fusion_provenance(shard.class_index, indices))
        # PNG encoding and writing run on the writer thread while the next shard is sampled (inline they added 19%
        # to the wall time on an H200 at 512 px). At most one shard waits; it is finished (and reported) before the
        # next one is handed over, so a callback that stops the run leaves exactly the shards reported before it.
        if pending is not None:
            finish(*pending)
        pending = (shard, writer.submit(_encode_and_write_shard, output_dir, shard, names, rows, images,
                                        run_fingerprint))  # fmt: skip
    if pending is not None:
        finish(*pending)
    if class_bar is not None:
        class_bar.close()
    overall.close()
