"""Benchmark stage 1 in cls mode: the reference's way vs ours, in one process, on the same model and data.

Reference-style baseline (DataDream's `datadream.py` run once per class): load the model for every class, train the
classes one after the other, VAE-encode every batch. Ours, the default path (`--cls_strategy auto`): load once, size
the groups to the free memory (a probe of a one- and a two-class step, included in its time), train each group's
classes together (grouped LoRA, one forward pass per step) on cached VAE posteriors; and the same with the group size
forced (`--classes_per_group`). All end with the same adapters up to float rounding; the script prints the default
path's ratio first, then every variant's wall time and ratio, the steady-state cost of one class's step and its ratio
(`StepClock`: without model loads, probes, caches and exports, what runs of the paper's 400 steps per class approach),
the peak memory of each and the largest adapter difference, plus the ablations between them (sequential with one
load, with the latent cache, grouped without it).

Tiny model, CPU (default; ~1 minute on 2 cores):

    python benchmarks/bench_stage1_cls.py

Real Stable Diffusion 2.1-base on a GPU, 10 classes, 16 shots, 20 steps per class:

    python benchmarks/bench_stage1_cls.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \
        --resolution 512 --k 16 --max_train_steps 20 --mixed_precision bf16 --classes_per_group 4

`--pretrained_model_name_or_path random-sd21-base` times the same architecture with random weights (no download;
`make benchmark-gpu` runs both benchmarks so).

Measured on this repo's 2-core CPU, tiny model, defaults (8 steps; the forced group: one of 10), before the default
path existed, six runs: 2.65x to 3.20x in wall time (the three full runs 2.99x, 3.01x, 3.20x; with --skip_ablations
2.65x, 2.70x, 2.81x), 2.38x and 2.51x per class-step at steady state; with 40 steps 2.22x wall, 2.10x steady. The CPU
is compute-bound (a batch of 80 costs nearly 10 batches of 8), so what grouping saves there is the small-batch
inefficiency of using both cores. On one H200, with an earlier version of the grouped path (forced groups of 4, latent
cache encoded one image at a time, each sample's LoRA factors gathered; the default path's probe and sizing did not
exist, and have not been measured on a GPU), an SD-2.1-base-shaped model with random weights, 512 px, bf16, 4 steps:
38.9 s -> 13.1 s (2.96x), peak 10.5 -> 35.1 GB; the tiny model, 8 steps, one group of 10: 11.7 s -> 2.0 s (5.8x).

The few-shot images are the bundled digits (square, so one crop offset each: the latent cache is exact and complete).
The baseline does not pay the reference's per-class process start-up (~5 s of imports each), so the ratio is a lower
bound of the real saving.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from datadream_hf.adapt.config import GeneratorTrainingConfig
from datadream_hf.adapt.data import FewShotData, build_units
from datadream_hf.adapt.modeling import load_generator_models
from datadream_hf.adapt.sequential import train_unit
from datadream_hf.adapt.train import train_generator
from datadream_hf.data import load_labelled_dataset
from datadream_hf.few_shot import draw_few_shot
from datadream_hf.lora import LORA_WEIGHT_NAME, load_safetensors
from datadream_hf.run_folder import class_folder_name
from datadream_hf.tiny_world.benchmarking import (
    RANDOM_SD21_BASE,
    StepClock,
    benchmark_model,
    max_adapter_difference,
    measure,
)
from datadream_hf.tiny_world.digits import DIGIT_NAMES, load_digits_dataset


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stage-1 cls benchmark: reference-style loop vs grouped LoRA.")
    parser.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None,
        help=f"Default: the tiny model. {RANDOM_SD21_BASE!r}: SD 2.1-base's architecture with random weights.",
    )  # fmt: skip
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=16, help="Shots per class (paper: 16).")
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--max_train_steps", type=int, default=8, help="Steps per class (paper: 400).")
    parser.add_argument("--resolution", type=int, default=None, help="Default: 32 for the tiny model, else 512.")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--classes_per_group", type=int, default=0,
        help="Classes per group of the forced-size variant; 0 (default): all of them in one group. The default path "
        "(auto) sizes its groups itself.",
    )  # fmt: skip
    parser.add_argument(
        "--skip_ablations", action="store_true", help="Only the baseline, the default path and the forced size."
    )
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads (default: torch's).")
    parser.add_argument("--output_dir", type=str, default=None, help="Work folder (default: a temp folder).")
    parser.add_argument("--json", type=str, default=None, help="Also write the results to this JSON file.")
    return parser.parse_args(input_args)


def few_shot_digits(num_classes: int, k: int, resolution: int) -> FewShotData:
    if not 1 <= num_classes <= len(DIGIT_NAMES):
        raise ValueError(f"--num_classes must be in [1, {len(DIGIT_NAMES)}] (the digits), got {num_classes}.")
    digits = load_digits_dataset(image_size=resolution)
    dataset = load_labelled_dataset(digits, split="train", class_names=DIGIT_NAMES[:num_classes])
    manifest = draw_few_shot(dataset, k=k, seed=0, source_name="digits", split="train")
    return FewShotData.from_dataset(dataset, manifest)


def reference_style(config: GeneratorTrainingConfig, data: FewShotData, accelerator, clock: StepClock) -> None:
    """One model load per class, classes one after the other, the VAE run at every step."""
    for class_index in range(len(data.class_names)):
        models = load_generator_models(config, accelerator.device)
        unit = build_units(config, data, models.tokenizers)[class_index]
        train_unit(models, unit, config, accelerator, step_callback=clock)
        del models
        gc.collect()


def read_adapters(output_dir: Path, data: FewShotData) -> list[dict[str, torch.Tensor]]:
    folders = [class_folder_name(i, name) for i, name in enumerate(data.class_names)]
    return [load_safetensors(output_dir / folder / LORA_WEIGHT_NAME) for folder in folders]


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-stage1-"))
    work.mkdir(parents=True, exist_ok=True)
    model, tiny = benchmark_model(args.pretrained_model_name_or_path, work, device)
    resolution = args.resolution or (32 if tiny else 512)
    data = few_shot_digits(args.num_classes, args.k, resolution)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=args.mixed_precision)
    common = {
        "pretrained_model_name_or_path": model, "revision": args.revision, "mode": "cls", "resolution": resolution,
        "train_batch_size": args.train_batch_size, "max_train_steps": args.max_train_steps, "lr_warmup_steps": 0,
        "mixed_precision": args.mixed_precision, "report_to": None, "checkpointing_steps": 10**9,
    }  # fmt: skip

    def config(name: str, **overrides) -> GeneratorTrainingConfig:
        return GeneratorTrainingConfig(**{**common, "output_dir": str(work / name), **overrides})

    # Warm-up (imports, allocator, kernel selection) so that it is charged to no variant.
    warm = config("warmup", cls_strategy="sequential", max_train_steps=1)
    train_generator(warm, FewShotData(data.images[: args.k], data.labels[: args.k], data.class_names[:1],
                                      data.manifest), accelerator)  # fmt: skip

    forced = args.classes_per_group or None  # None: all classes in one group
    size = f"groups of {forced}" if forced else "one group"
    variants = {  # name: (label, strategy, cache_latents, classes_per_group)
        "reference": ("reference-style: load per class, sequential, VAE every step", "sequential", False, None),
        "auto": ("default (auto): groups sized to memory, cached latents", "auto", True, None),
        "ours": (f"grouped, {size} (forced), one load, cached latents", "grouped", True, forced),
        "seq": ("sequential, one load, VAE every step", "sequential", False, None),
        "seq-cache": ("sequential, one load, cached latents", "sequential", True, None),
        "grouped": (f"grouped, {size} (forced), one load, VAE every step", "grouped", False, forced),
    }
    if args.skip_ablations:
        variants = {k: v for k, v in variants.items() if k in ("reference", "auto", "ours")}
    results = {}
    for name, (label, strategy, cache, classes_per_group) in variants.items():
        cfg = config(name, cls_strategy=strategy, cache_latents=cache, classes_per_group=classes_per_group)
        gc.collect()
        clock = StepClock(device)
        with measure(device) as m:
            if name == "reference":
                reference_style(cfg, data, accelerator, clock)
            else:
                train_generator(cfg, data, accelerator, step_callback=clock)
        results[name] = {"label": label, "seconds": m.seconds, "peak_mib": m.peak_bytes / 2**20,
                         "peak_above_start_mib": m.peak_above_start_mib, "memory": m.memory_kind,
                         "seconds_per_class_step": clock.seconds_per_class_step()}  # fmt: skip

    reference = read_adapters(work / "reference", data)
    for name, result in results.items():
        differences = [max_adapter_difference(a, b) for a, b in zip(reference, read_adapters(work / name, data))]
        result["max_abs_diff"] = max(d[0] for d in differences)
        result["max_relative_diff_B"] = max(d[1] for d in differences)
        result["speedup_vs_reference"] = results["reference"]["seconds"] / result["seconds"]
        result["steady_speedup_vs_reference"] = (
            results["reference"]["seconds_per_class_step"] / result["seconds_per_class_step"]
        )

    grouping = json.loads((work / "auto" / "datadream_config.json").read_text())["cls_grouping"]
    results["auto"].update(classes_per_group=grouping["classes_per_group"], grouping_reason=grouping["reason"])

    def ratio(name: str, title: str) -> str:
        result = results[name]
        return (
            f"{title} vs reference-style: {result['speedup_vs_reference']:.2f}x faster in wall time (target >= 3x), "
            f"{result['steady_speedup_vs_reference']:.2f}x per class-step at steady state (what long runs approach); "
            f"adapters equal to {result['max_abs_diff']:.1e} max abs ({result['max_relative_diff_B']:.1e} relative "
            "on B)."
        )

    print(f"\nStage 1, cls mode: {args.num_classes} classes x {args.max_train_steps} steps of batch "
          f"{args.train_batch_size}, K={args.k}, {resolution} px, {model}, {device}, mixed precision "
          f"{args.mixed_precision}; memory = {results['auto']['memory']}")  # fmt: skip
    print(ratio("auto", f"default path (auto, {grouping['classes_per_group']} classes per group)"))
    print(f"  why that size: {grouping['reason']}")
    print(f"\n{'variant':<62}{'wall s':>9}{'speed-up':>10}{'ms/class-step':>14}{'steady':>8}{'peak MiB':>10}"
          f"{'+MiB':>8}{'max|dW|':>10}{'rel dB':>9}")  # fmt: skip
    for result in results.values():
        print(f"{result['label']:<62}{result['seconds']:>9.2f}{result['speedup_vs_reference']:>9.2f}x"
              f"{1000 * result['seconds_per_class_step']:>14.1f}{result['steady_speedup_vs_reference']:>7.2f}x"
              f"{result['peak_mib']:>10.0f}{result['peak_above_start_mib']:>8.0f}{result['max_abs_diff']:>10.2e}"
              f"{result['max_relative_diff_B']:>9.1e}")  # fmt: skip
    print("\n" + ratio("ours", f"grouped, {size} (forced)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device, "results": results}, indent=1))
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(parse_args())
