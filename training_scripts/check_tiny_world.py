"""Sanity checks of the tiny world (by default the weights shipped in `datadream_hf/assets/tiny_world/`):

1. the generator follows prompts about what it was trained on: captions of real test images (which it never saw) as
   prompts give samples whose own descriptions agree with the prompt far more often than shuffled prompts do;
2. it does not know which digit is which: its samples for "a photo of a {digit}" are of the prompted class about as
   often as chance, judged by a logistic regression fit on the real train split; and no caption of pre-training
   names a digit;
3. the CLIP backbone's frozen image features beat its random init in a 16-shot linear probe, while its zero-shot
   accuracy with the class names stays at chance.

    OMP_NUM_THREADS=1 python training_scripts/check_tiny_world.py --output_dir outputs/tiny_world_checks
    OMP_NUM_THREADS=1 python training_scripts/check_tiny_world.py --update_card   # add the numbers to the card

A single-process CPU job (a few minutes); it writes `checks.json` and PNG sample grids to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from datadream_hf.data import decode_images, labels_of
from datadream_hf.few_shot import draw_few_shot
from datadream_hf.files import write_json_atomic
from datadream_hf.grids import chunk, image_grid
from datadream_hf.tiny_world.captions import describe_digit
from datadream_hf.tiny_world.checks import (
    caption_informativeness,
    check_clip,
    check_frozen_generator,
    check_no_label_leak,
    check_prompt_following,
    checks_markdown,
    class_fidelity,
    fit_digit_probe,
)
from datadream_hf.tiny_world.digits import load_digits_dataset
from datadream_hf.tiny_world.world import TINY_WORLD_METADATA_NAME, render_tiny_world_card, tiny_world_paths
from datadream_hf.versions import library_versions

logger = logging.getLogger("check_tiny_world")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default=None, help="Pipeline folder (default: the shipped tiny world).")
    parser.add_argument("--clip", default=None, help="CLIPModel folder (default: the shipped tiny world).")
    parser.add_argument("--output_dir", default="outputs/tiny_world_checks")
    parser.add_argument("--images_per_class", type=int, default=50, help="Frozen-generator samples per class.")
    parser.add_argument("--num_prompts", type=int, default=200, help="Test captions used as prompts.")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument(
        "--update_card", action="store_true", help="Re-render the shipped README.md with these numbers."
    )
    args = parser.parse_args(input_args)
    for name in ("images_per_class", "num_prompts", "shots", "num_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    return args


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.num_threads)
    generator_path = args.generator or tiny_world_paths().generator
    clip_path = args.clip or tiny_world_paths().clip
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(generator_path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    # 1. Real data, the K shots and the probe that judges generated digits.
    digits = load_digits_dataset()
    class_names = digits["train"].features["label"].names
    train_images, train_labels = decode_images(digits["train"]), labels_of(digits["train"])
    test_images, test_labels = decode_images(digits["test"]), labels_of(digits["test"])
    manifest = draw_few_shot(digits["train"], k=args.shots, seed=args.seed)
    shots = decode_images(manifest.select(digits["train"]))
    shot_labels = [c for c, rows in enumerate(manifest.indices) for _ in rows]
    probe = fit_digit_probe(train_images, train_labels, args.seed)
    results = {"probe_real_test_accuracy": class_fidelity(probe, test_images, test_labels)["accuracy"]}

    # 2. Prompt following, on captions of test images the generator never saw.
    logger.info("prompt following")
    results["prompt_following"], samples = check_prompt_following(
        pipe, probe, test_images[: args.num_prompts], test_labels[: args.num_prompts], args.seed
    )
    pairs = [[real, fake] for real, fake in zip(test_images[:16], samples[:16])]
    image_grid([[p[0] for p in pairs], [p[1] for p in pairs]], scale=2).save(output_dir / "prompt_following.png")
    results["captions"] = caption_informativeness(train_images, train_labels, test_images, test_labels, args.seed)

    # 3. The frozen generator does not know the class names, and no pre-training caption names a digit.
    logger.info("frozen generator")
    results["frozen_generator"], rows = check_frozen_generator(
        pipe, probe, class_names, args.images_per_class, args.seed
    )
    image_grid([row[:16] for row in rows], scale=2).save(output_dir / "frozen_generator.png")
    pretraining = decode_images(manifest.complement(digits["train"]).select_columns(["image"]))
    results["label_leak"] = check_no_label_leak([describe_digit(image) for image in pretraining])
    results["label_leak"]["num_pretraining_images"] = len(pretraining)

    # 4. The CLIP backbone.
    logger.info("CLIP linear probe")
    results["clip"] = check_clip(clip_path, shots, shot_labels, test_images, test_labels, class_names, args.seed)

    results["config"] = vars(args)
    results["versions"] = library_versions()
    write_json_atomic(output_dir / "checks.json", results)
    image_grid(chunk(shots, 16), scale=2).save(output_dir / "shots.png")
    print(checks_markdown(results))
    if args.update_card:
        _update_card(Path(generator_path).parent, results)
    return results


def _update_card(root: Path, results: dict) -> None:
    metadata = json.loads((root / TINY_WORLD_METADATA_NAME).read_text())
    metadata["checks"] = {
        "command": "OMP_NUM_THREADS=1 python training_scripts/check_tiny_world.py --update_card",
        "markdown": checks_markdown(results),
        "results": {k: v for k, v in results.items() if k not in ("config", "versions")},
    }
    write_json_atomic(root / TINY_WORLD_METADATA_NAME, metadata)
    render_tiny_world_card(root, metadata)


if __name__ == "__main__":
    main(parse_args())
