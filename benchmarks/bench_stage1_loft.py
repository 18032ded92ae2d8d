"""Benchmark stage 1 in image mode (LoFT): the reference's way vs ours, on the same model, images and steps.

The reference's way (ExplainableML/LoFT `sd-finetune/run.sh`): one process per real image, each a fresh `python` that
imports the libraries, loads the base model and trains that image's adapter at batch 1, the VAE run at every step.
Here each such process is this script with `--train_one_image i` (the sequential path, `adapt.sequential.train_unit`,
from the image's seeded init), run one after the other. Ours: one fresh process (this script with
`--train_all_images`, so it pays one start too), the default `train_datadream_lora.py --mode image` path
(`train_generator`): the model loaded once, the adapters sized into groups to the free memory (`--cls_strategy auto`,
its probe included in the time) and trained together on the grouped engine (one forward pass per step for a whole
group) on cached VAE posteriors. The script prints the wall-time ratio and the largest difference between the
adapters of the two ways (float rounding: grouping and the latent cache change the order of sums).

Tiny model, CPU, the issue's setting (10 classes x K=4 = 40 adapters, 20 steps each; a few minutes, most of it the
reference's 40 process starts):

    python benchmarks/bench_stage1_loft.py

A smoke run (2 classes x K=2, 2 steps): `--quick`. LoFT's own schedule is 600 steps per image (`--max_train_steps
600`, 20 minutes on 2 cores: 1078.2 s against 144.5 s, 7.5x; at 20 steps 22.6x, the process starts weighing more);
SD 2.1-base's architecture with random weights on a GPU: `--pretrained_model_name_or_path random-sd21-base
--resolution 512 --mixed_precision bf16`.

The few-shot images are the bundled digits (square: the center crop keeps them whole, one cached posterior each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from datadream_hf.adapt.config import GeneratorTrainingConfig
from datadream_hf.adapt.data import FewShotData, build_units
from datadream_hf.adapt.modeling import load_generator_models
from datadream_hf.adapt.sequential import train_unit
from datadream_hf.adapt.train import train_generator
from datadream_hf.adapter_index import read_adapter_index
from datadream_hf.data import load_labelled_dataset
from datadream_hf.few_shot import draw_few_shot
from datadream_hf.lora import LORA_WEIGHT_NAME, load_safetensors
from datadream_hf.tiny_world.benchmarking import RANDOM_SD21_BASE, benchmark_model, max_adapter_difference, measure
from datadream_hf.tiny_world.digits import DIGIT_NAMES, load_digits_dataset

QUICK = {"num_classes": 2, "k": 2, "max_train_steps": 2}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stage-1 image mode (LoFT): a process per image vs grouped.")
    parser.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None,
        help=f"Default: the tiny model. {RANDOM_SD21_BASE!r}: SD 2.1-base's architecture with random weights.",
    )  # fmt: skip
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=4, help="Shots per class: one adapter each.")
    parser.add_argument("--max_train_steps", type=int, default=20, help="Steps per image (LoFT: 600).")
    parser.add_argument("--resolution", type=int, default=None, help="Default: 32 for the tiny model, else 512.")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--classes_per_group", type=int, default=None,
        help="Adapters per group of ours; default: sized to the free memory (auto), as the script does.",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 classes x K=2, 2 steps.")
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads, of both ways (default: torch's).")
    parser.add_argument("--output_dir", type=str, default=None, help="Work folder (default: a temp folder).")
    parser.add_argument("--json", type=str, default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--train_one_image", type=int, default=None, help=argparse.SUPPRESS)  # a reference process
    parser.add_argument("--train_all_images", action="store_true", help=argparse.SUPPRESS)  # our process
    args = parser.parse_args(input_args)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def few_shot_digits(num_classes: int, k: int, resolution: int) -> FewShotData:
    if not 1 <= num_classes <= len(DIGIT_NAMES):
        raise ValueError(f"--num_classes must be in [1, {len(DIGIT_NAMES)}] (the digits), got {num_classes}.")
    digits = load_digits_dataset(image_size=resolution)
    dataset = load_labelled_dataset(digits, split="train", class_names=DIGIT_NAMES[:num_classes])
    manifest = draw_few_shot(dataset, k=k, seed=0, source_name="digits", split="train")
    return FewShotData.from_dataset(dataset, manifest)


def make_config(args: argparse.Namespace, output_dir: Path, **overrides) -> GeneratorTrainingConfig:
    """LoFT's settings (image mode's defaults) at the benchmark's steps; no warm-up beyond the run (10 of 600)."""
    return GeneratorTrainingConfig(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path, mode="image", resolution=args.resolution,
        max_train_steps=args.max_train_steps, lr_warmup_steps=min(10, args.max_train_steps // 2),
        mixed_precision=args.mixed_precision, report_to=None, checkpointing_steps=10**9, output_dir=str(output_dir),
        **overrides,
    )  # fmt: skip


def train_one_image(args: argparse.Namespace) -> None:
    """The reference's process: load the model, train image `args.train_one_image`'s adapter, VAE every step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = few_shot_digits(args.num_classes, args.k, args.resolution)
    config = make_config(args, Path(args.output_dir) / "reference", cls_strategy="sequential", cache_latents=False)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=args.mixed_precision)
    models = load_generator_models(config, accelerator.device)
    unit = build_units(config, data, models.tokenizers)[args.train_one_image]
    train_unit(models, unit, config, accelerator)
    accelerator.end_training()


def train_all_images(args: argparse.Namespace) -> None:
    """Our process: every image's adapter, grouped (`train_generator`, as `train_datadream_lora.py --mode image`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = few_shot_digits(args.num_classes, args.k, args.resolution)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=args.mixed_precision)
    train_generator(make_config(args, Path(args.output_dir) / "ours", classes_per_group=args.classes_per_group), data,
                    accelerator)  # fmt: skip
    accelerator.end_training()


def run_process(args: argparse.Namespace, *role: str) -> None:
    """This script in a fresh process, in `role` (`--train_one_image i` or `--train_all_images`), with the same
    settings and threads as this one."""
    flags = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--num_classes",
             str(args.num_classes), "--k", str(args.k), "--max_train_steps", str(args.max_train_steps),
             "--resolution", str(args.resolution), "--mixed_precision", args.mixed_precision, "--output_dir",
             args.output_dir]  # fmt: skip
    if args.classes_per_group:
        flags += ["--classes_per_group", str(args.classes_per_group)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, str(Path(__file__).resolve()), *flags, *role]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(role)} failed:\n{result.stderr[-3000:]}")


def read_adapters(output_dir: Path, folders: list[str]) -> list[dict[str, torch.Tensor]]:
    return [load_safetensors(output_dir / folder / LORA_WEIGHT_NAME) for folder in folders]


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-stage1-loft-"))
    work.mkdir(parents=True, exist_ok=True)
    args.output_dir = str(work)
    args.pretrained_model_name_or_path, tiny = benchmark_model(args.pretrained_model_name_or_path, work, device)
    args.resolution = args.resolution or (32 if tiny else 512)
    data = few_shot_digits(args.num_classes, args.k, args.resolution)
    num_images = len(data.images)

    # Ours (one process), then the reference's way (a process per image, one after the other, as `run.sh` loops).
    with measure(device) as ours:
        run_process(args, "--train_all_images")
    with measure(device) as reference:
        for image in range(num_images):
            run_process(args, "--train_one_image", str(image))

    folders = [folder for _, folder in sorted(read_adapter_index(work / "ours")["adapters"].items(),
                                              key=lambda item: int(item[0]))]  # fmt: skip
    differences = [max_adapter_difference(a, b) for a, b in
                   zip(read_adapters(work / "reference", folders), read_adapters(work / "ours", folders))]  # fmt: skip
    grouping = json.loads((work / "ours" / "datadream_config.json").read_text())["cls_grouping"]
    results = {
        "adapters": num_images, "steps_per_adapter": args.max_train_steps, "device": device,
        "model": args.pretrained_model_name_or_path, "resolution": args.resolution,
        "reference_seconds": reference.seconds, "ours_seconds": ours.seconds,
        "speedup": reference.seconds / ours.seconds,
        "max_abs_diff": max(d[0] for d in differences), "max_relative_diff_B": max(d[1] for d in differences),
        "adapters_per_group": grouping["classes_per_group"], "grouping_reason": grouping["reason"],
    }  # fmt: skip
    print(f"\nStage 1, image mode (LoFT): {args.num_classes} classes x K={args.k} = {num_images} adapters, "
          f"{args.max_train_steps} steps of batch 1 each, {args.resolution} px, {results['model']}, {device}, "
          f"mixed precision {args.mixed_precision}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"  reference's way (a fresh process per image, VAE every step): {reference.seconds:8.2f} s")
    print(f"  ours (one process, grouped, {grouping['classes_per_group']} adapters per group): {ours.seconds:8.2f} s")
    print(f"    why that size: {grouping['reason']}")
    print(f"ours vs the reference's way: {results['speedup']:.2f}x faster in wall time (target >= 5x); adapters equal "
          f"to sequential training to {results['max_abs_diff']:.1e} max abs ({results['max_relative_diff_B']:.1e} "
          "relative on B)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.train_one_image is not None:
        train_one_image(parsed)
    elif parsed.train_all_images:
        train_all_images(parsed)
    else:
        main(parsed)
