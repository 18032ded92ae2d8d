"""Sanity checks of the tiny world (by default the weights shipped in `datadream_hf/assets/tiny_world/`):

1. the frozen generator's samples for "a photo of a {digit}" look like digits (high probe confidence) but are not of
   the prompted class (probe accuracy ~ chance), judged by a logistic regression fit on the real train split;
2. a DataDream-style LoRA trained on the few shots of one or two classes moves their samples toward the class;
3. the CLIP backbone's frozen image features beat chance (and its random init) in a 16-shot linear probe, while
   its zero-shot accuracy stays at chance.

    OMP_NUM_THREADS=1 python training_scripts/check_tiny_world.py --output_dir outputs/tiny_world_checks
    OMP_NUM_THREADS=1 python training_scripts/check_tiny_world.py --update_card   # add the numbers to the card

A single-process CPU job (~5 minutes); it writes `checks.json` and PNG sample grids to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from datadream_hf.few_shot import draw_few_shot
from datadream_hf.files import write_json_atomic
from datadream_hf.grids import image_grid
from datadream_hf.lora import UNET_TARGET_MODULES
from datadream_hf.tiny_world.checks import (
    check_clip,
    check_generator,
    check_generator_lora,
    checks_markdown,
    class_fidelity,
    fit_digit_probe,
    split_images,
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
    parser.add_argument("--images_per_class", type=int, default=50)
    parser.add_argument("--lora_classes", default="0,1", help="Comma-separated class ids; one LoRA per class.")
    parser.add_argument(
        "--lora_steps", type=int, default=400, help="Reference cls mode with K=16: 200 epochs x 2 steps of 8."
    )
    parser.add_argument(
        "--lora_learning_rates", default="1e-4,1e-3", help="Comma-separated; one LoRA check per learning rate."
    )
    parser.add_argument(
        "--lora_diagnostic_unet_targets",
        default="conv1,conv2",
        help="Also train LoRAs with these UNet modules added to the reference's attention targets ('' to skip).",
    )
    parser.add_argument("--clip_lora_steps", type=int, default=1000)
    parser.add_argument("--clip_lora_learning_rate", type=float, default=1e-3)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument(
        "--update_card", action="store_true", help="Re-render the shipped README.md with these numbers."
    )
    args = parser.parse_args(input_args)
    if args.images_per_class < 1:
        parser.error(f"--images_per_class must be >= 1, got {args.images_per_class}.")
    return args


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.num_threads)
    generator_path = args.generator or tiny_world_paths().generator
    clip_path = args.clip or tiny_world_paths().clip
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # Phase 1: real data, the K shots and the probe that judges generated digits.
    digits = load_digits_dataset()
    class_names = digits["train"].features["label"].names
    train_images, train_labels = split_images(digits["train"])
    test_images, test_labels = split_images(digits["test"])
    manifest = draw_few_shot(digits["train"], k=args.shots, seed=args.seed)
    shots, shot_labels = split_images(manifest.select(digits["train"]))
    probe = fit_digit_probe(train_images, train_labels, args.seed)
    real = class_fidelity(probe, test_images, test_labels)
    results = {"probe_real_test_accuracy": real["accuracy"], "probe_real_test_confidence": real["mean_confidence"]}

    # Phase 2: the frozen generator.
    logger.info("sampling the frozen generator")
    results["frozen_generator"], samples = check_generator(
        generator_path, probe, class_names, args.images_per_class, args.seed
    )
    image_grid([row[:16] for row in samples], scale=2).save(output_dir / "frozen_generator.png")

    # Phase 3: LoRA nudges, one per class (cls mode), learning rate and UNet target set.
    results["lora"] = []
    target_sets = [None] + (
        [args.lora_diagnostic_unet_targets.split(",")] if args.lora_diagnostic_unet_targets else []
    )
    for targets in target_sets:
        for lr in (float(x) for x in args.lora_learning_rates.split(",")):
            for c in (int(c) for c in args.lora_classes.split(",")):
                unet_targets = None if targets is None else UNET_TARGET_MODULES + targets
                logger.info(
                    "LoRA check: class %s, %d steps, lr %g, UNet targets %s", c, args.lora_steps, lr, unet_targets
                )
                metrics, samples = check_generator_lora(
                    generator_path,
                    probe,
                    shots,
                    shot_labels,
                    class_names,
                    [c],
                    args.lora_steps,
                    lr,
                    args.images_per_class,
                    args.seed,
                    unet_target_modules=unet_targets,
                )
                results["lora"].append(metrics)
                suffix = "" if targets is None else "_" + "_".join(targets)
                image_grid([row[:16] for row in samples], scale=2).save(
                    output_dir / f"lora_class{c}_lr{lr:g}{suffix}.png"
                )

    # Phase 4: the CLIP backbone.
    logger.info("CLIP linear probe")
    results["clip"] = check_clip(
        clip_path,
        shots,
        shot_labels,
        test_images,
        test_labels,
        class_names,
        lora_steps=args.clip_lora_steps,
        lora_learning_rate=args.clip_lora_learning_rate,
        seed=args.seed,
    )

    results["config"] = vars(args)
    results["versions"] = library_versions()
    write_json_atomic(output_dir / "checks.json", results)
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
