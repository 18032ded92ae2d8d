"""Benchmark stage 2: sampling with per-class adapters vs the plain base pipeline, and vs the reference's way.

In one process, on the same model, prompts and per-image seeds, N classes x M images each:
  base       the frozen pipeline, no adapter (the speed to match);
  ours       one pipeline, each class's adapter fused into the weights (`FusedAdapterSwitcher`), so sampling has no
             LoRA cost; the switch is timed apart and reported as a fraction of the class's sampling time;
  ours+write the same through `generate_shards` (PNG encoding + Parquet shards on disk);
  unfused    one pipeline, each class's adapter loaded but not fused (peft LoRA layers active while sampling);
  fusion     LoFT (`--fusion pairs`): `--fusion_k` image adapters per class (rank 2, UNet attention, LoFT's placement)
             stacked in grouped LoRA layers, each image of a batch with its own weighted pair, one pipeline call per
             batch (target >= 0.8x base's images/s); loading a class's stacks is timed apart as its switch. Its ratio
             is paired: each class is sampled by the base pipeline again right before fusion samples it, so a machine
             whose speed drifts over the run (a shared CPU) shifts both sides alike;
  reference  the reference's `generate.py`: the full pipeline loaded again for every class, adapter unfused.
The adapters are stand-ins (random A, small random B): sampling cost does not depend on what they learned.
`--variants` picks which run beside base (default: all of them).

Tiny model, CPU (default; about a minute on 2 cores):

    python benchmarks/bench_generation.py

Real Stable Diffusion 2.1-base on a GPU (fp16 by default there, as the reference), 10 classes x 16 images:

    python benchmarks/bench_generation.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \
        --images_per_class 16 --num_inference_steps 50

`--pretrained_model_name_or_path random-sd21-base` times the same architecture with random weights (no download);
on a CPU, fusion alone at a size that finishes (5 minutes on 2 cores):

    python benchmarks/bench_generation.py --pretrained_model_name_or_path random-sd21-base --variants fusion \
        --num_classes 2 --images_per_class 4 --batch_size 4 --num_inference_steps 8 --resolution 256

Measured on one H200, SD-2.1-base-shaped model with random weights, 512 px, fp16, 10 classes x 8 images, 20 steps:
base 6.52 img/s, ours 6.10 (0.94x with switches, 0.99x sampling only), switch 0.064 s (5.2% of a class of 8 images,
0.03% of a class of 500 x 50 steps), unfused adapters 4.03 img/s; at 25 steps the reference-style reload per class
made 1.80 img/s against ours' 3.78 (2.1x). Fusion, by the CPU command above on 2 cores, alone (no GPU run yet):
0.99x the paired base (a UNet call 5.9 s, fusion's share of it 1.1%); at 512 px, 4 steps: 1.04x (below the noise);
the tiny model: 0.89x.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from datadream_hf.adapt.config import GeneratorTrainingConfig
from datadream_hf.adapt.modeling import load_generator_models
from datadream_hf.generate.adapters import AdapterSet, resolve_adapters
from datadream_hf.generate.config import DTYPES, GenerationConfig
from datadream_hf.generate.run import describe_run
from datadream_hf.generate.sampling import SyntheticImageSampler, load_generation_pipeline
from datadream_hf.generate.shards import generate_shards
from datadream_hf.prompts import PromptTemplate
from datadream_hf.synthetic import plan_shards
from datadream_hf.tiny_world.benchmarking import (
    RANDOM_SD21_BASE,
    benchmark_model,
    measure,
    synchronize,
    write_random_class_adapters,
    write_random_image_adapters,
)
from datadream_hf.tiny_world.digits import DIGIT_NAMES

VARIANTS = ("ours", "write", "unfused", "fusion", "reference")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stage-2 benchmark: fused class adapters vs base vs reload.")
    parser.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None,
        help=f"Default: the tiny model. {RANDOM_SD21_BASE!r}: SD 2.1-base's architecture with random weights.",
    )  # fmt: skip
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--images_per_class", type=int, default=8)
    parser.add_argument("--num_inference_steps", type=int, default=20, help="Reference: 50.")
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", type=str, default="auto", help="'auto': float16 on GPU, float32 on CPU.")
    parser.add_argument("--resolution", type=int, default=None, help="Default: the model's own.")
    parser.add_argument("--fusion_k", type=int, default=4, help="Image adapters per class of the fusion case.")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="What runs beside base (default: all)."
    )
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads (default: torch's).")
    parser.add_argument("--output_dir", type=str, default=None, help="Work folder (default: a temp folder).")
    parser.add_argument("--json", type=str, default=None, help="Also write the results to this JSON file.")
    return parser.parse_args(input_args)


def sample_classes(variants: list[tuple[SyntheticImageSampler | None, object]], num_classes: int, images: int,
                   device: str) -> list:  # fmt: skip
    """Samples every class with each (sampler, switch) of `variants` in turn, class by class (interleaved, so a drift
    in the machine's speed shifts every variant alike); returns per variant its per-class sampling and switching
    seconds and its images as uint8 arrays. `switch(c)`, timed apart, readies class c; what it returns, if not None,
    samples the class instead of `sampler` (a fresh pipeline's sampler)."""
    runs = [{"sampling_s": [], "switch_s": [], "images": []} for _ in variants]
    for c in range(num_classes):
        for (sampler, switch), run in zip(variants, runs):
            synchronize(device)
            t0 = time.perf_counter()
            if switch is not None:
                sampler = switch(c) or sampler
            synchronize(device)
            t1 = time.perf_counter()
            out = sampler.sample(c, list(range(images)))
            synchronize(device)
            run["switch_s"].append(t1 - t0)
            run["sampling_s"].append(time.perf_counter() - t1)
            run["images"] += [np.asarray(image) for image in out]
    return runs


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.ERROR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-generation-"))
    work.mkdir(parents=True, exist_ok=True)
    model, _ = benchmark_model(args.pretrained_model_name_or_path, work, device)
    names = [DIGIT_NAMES[i % 10] + ("" if i < 10 else f"_{i}") for i in range(args.num_classes)]
    config = GenerationConfig(
        images_per_class=args.images_per_class, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, batch_size=args.batch_size, shard_size=args.images_per_class,
        dtype=args.dtype, resolution=args.resolution,
    )  # fmt: skip
    dtype = config.resolved_dtype(device)
    template = PromptTemplate()
    variants = set(args.variants)
    class_variants = variants - {"fusion"}  # everything that uses the stand-in class adapters

    if class_variants:  # stand-in class adapters in the stage-1 layout
        adapter_dir = work / "adapters"
        models = load_generator_models(GeneratorTrainingConfig(pretrained_model_name_or_path=model))
        write_random_class_adapters(models, adapter_dir, names)
        del models
        adapters = resolve_adapters(str(adapter_dir))

    def load():
        return load_generation_pipeline(model, torch_dtype=DTYPES[dtype]).to(device)

    pipeline = load()
    denoiser = pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer  # SD3: an MMDiT
    processors = sorted({type(p).__name__ for p in denoiser.attn_processors.values()})
    base = SyntheticImageSampler(pipeline, AdapterSet.none(names), template, config)
    resolution = base.resolution
    base.sample(0, list(range(min(2, args.images_per_class))))  # warm-up: kernels, allocator
    n, m = args.num_classes, args.images_per_class
    results: dict[str, dict] = {}
    images: dict[str, list[np.ndarray]] = {}  # per variant that uses the class adapters, to compare fused vs unfused

    def record(name, label, measurement, run, seconds=None):
        seconds = measurement.seconds if seconds is None else seconds
        results[name] = {
            "label": label, "seconds": seconds, "images_per_s": n * m / seconds,
            "peak_mib": measurement.peak_bytes / 2**20, "memory": measurement.memory_kind,
        }  # fmt: skip
        if run:
            switches, sampling = run["switch_s"], run["sampling_s"]
            later = switches[1:] or switches  # the first switch also snapshots the base weights, once per run
            per_image_step = sum(sampling) / (n * m * args.num_inference_steps)
            results[name].update(
                sampling_s=sum(sampling), switch_s=sum(switches), first_switch_s=switches[0],
                mean_switch_s=sum(later) / len(later),
                switch_fraction=sum(later) / len(later) / (sum(sampling) / n),
                # A class of the reference's run: 500 images x 50 steps.
                switch_fraction_500x50=sum(later) / len(later) / (per_image_step * 500 * 50),
            )  # fmt: skip

    # 1. The plain base pipeline, then ours on the same pipeline (the switcher restores the exact base weights).
    if class_variants:
        with measure(device) as m_base:
            (base_run,) = sample_classes([(base, None)], n, m, device)
        record("base", "base pipeline, no adapter", m_base, base_run)
    if "ours" in variants:
        ours = SyntheticImageSampler(pipeline, adapters, template, config)
        with measure(device) as m_ours:
            (ours_run,) = sample_classes([(ours, lambda c: ours.switcher.use(adapters.weight_file(c)))], n, m, device)
        record("ours", "ours: one pipeline, adapter fused per class", m_ours, ours_run)
        images["ours"] = ours_run["images"]
        ours.switcher.reset()

    # 2. Ours through the shard writer (PNG + Parquet), to see what writing costs.
    if "write" in variants:
        writer = SyntheticImageSampler(pipeline, adapters, template, config)
        run_info = describe_run(writer, {"pretrained_model_name_or_path": model}, dtype)
        with measure(device) as m_write:
            shards = plan_shards(n, m, m)
            generate_shards(writer, work / "generated", shards, run_info["fingerprint"], show_progress=False)
        record("ours+write", "ours + PNG encoding and Parquet shards", m_write, None)
        writer.switcher.reset()

    # 3. Unfused: adapters loaded as peft layers, active while sampling.
    if "unfused" in variants:
        unfused = SyntheticImageSampler(pipeline, AdapterSet.none(names), template, config)

        def load_unfused(c):
            pipeline.unload_lora_weights()
            pipeline.load_lora_weights(
                str(adapters.weight_file(c).parent), adapter_name=f"class{c}", use_safetensors=True
            )

        with measure(device) as m_unfused:
            (unfused_run,) = sample_classes([(unfused, load_unfused)], n, m, device)
        record("unfused", "one pipeline, adapter loaded unfused per class", m_unfused, unfused_run)
        images["unfused"] = unfused_run["images"]
        pipeline.unload_lora_weights()

    # 4. LoFT fusion: image adapters stacked per class, a weighted pair per image, several pairs per pipeline call;
    # each class sampled by the base pipeline right before, the ratio taken against those paired base times.
    if "fusion" in variants:
        image_dir = work / "image_adapters"
        image_models = load_generator_models(
            GeneratorTrainingConfig(pretrained_model_name_or_path=model, rank=2, train_text_encoder=False)
        )
        write_random_image_adapters(image_models, image_dir, names, args.fusion_k)
        del image_models
        image_adapters = resolve_adapters(str(image_dir))
        fused = SyntheticImageSampler(pipeline, image_adapters, template, dataclasses.replace(config, fusion="pairs"))

        def load_class(c):
            fused.fusion.load(image_adapters.image_weight_files(c))

        with measure(device) as m_fusion:
            paired_base, fusion_run = sample_classes([(base, None), (fused, load_class)], n, m, device)
        if "base" not in results:
            record("base", "base pipeline, no adapter (paired with fusion)", m_fusion, paired_base,
                   seconds=sum(paired_base["sampling_s"]))  # fmt: skip
        fusion_seconds = sum(fusion_run["sampling_s"]) + sum(fusion_run["switch_s"])
        label = f"LoFT fusion: {args.fusion_k} image adapters/class, pairs batched"
        record("fusion", label, m_fusion, fusion_run, seconds=fusion_seconds)
        results["fusion"]["paired_base_images_per_s"] = n * m / sum(paired_base["sampling_s"])
        fused.reset()

    # 5. Reference-style: a fresh pipeline per class, adapter unfused.
    if "reference" in variants:
        del base, pipeline
        ours = unfused = writer = fused = None  # whichever ran: they hold the pipeline
        held = []

        def reload(c):
            held.clear()
            gc.collect()  # the last class's pipeline is gone before the next one loads, as with a process per class
            fresh = load()
            fresh.load_lora_weights(str(adapters.weight_file(c).parent), use_safetensors=True)
            held.append(SyntheticImageSampler(fresh, AdapterSet.none(names), template, config))  # LoRA stays unfused
            return held[0]

        with measure(device) as m_reference:
            (reference_run,) = sample_classes([(None, reload)], n, m, device)
        record("reference", "reference-style: pipeline reloaded per class, unfused", m_reference, reference_run)
        images["reference"] = reference_run["images"]
    for name in ("unfused", "reference"):  # the same adapters unfused vs fused into the weights: images should agree
        if name in images and "ours" in images:
            results[name]["max_pixel_diff_vs_ours"] = int(
                max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(images[name], images["ours"]))
            )

    base_ips = results["base"]["images_per_s"]
    print(f"\nStage 2: {n} classes x {m} images, {args.num_inference_steps} steps, guidance {args.guidance_scale}, "
          f"batch {args.batch_size}, {resolution} px, {dtype}, {model}, {device}; attention processors "
          f"{processors}; memory = {results['base']['memory']}")  # fmt: skip
    print(f"{'variant':<58}{'wall s':>8}{'img/s':>8}{'vs base':>9}{'switch/class':>14}{'peak MiB':>10}")
    for r in results.values():
        fraction = f"{r['switch_fraction']:.1%}" if "switch_fraction" in r else "-"
        versus = r["images_per_s"] / r.get("paired_base_images_per_s", base_ips)
        print(f"{r['label']:<58}{r['seconds']:>8.2f}{r['images_per_s']:>8.2f}{versus:>8.2f}x"
              f"{fraction:>14}{r['peak_mib']:>10.0f}")  # fmt: skip
    if "ours" in variants:
        ours_r = results["ours"]
        sampling_ratio = n * m / ours_r["sampling_s"] / base_ips
        print(
            f"\nours: {ours_r['images_per_s'] / base_ips:.2f}x the base pipeline's images/s with switches "
            f"({sampling_ratio:.2f}x sampling only; target >= 0.90); adapter switch {ours_r['mean_switch_s']:.3f} s "
            f"(first: {ours_r['first_switch_s']:.3f} s) = {ours_r['switch_fraction']:.1%} of a class's sampling "
            f"time here, {ours_r['switch_fraction_500x50']:.2%} for a class of 500 images x 50 steps (target < 5%)."
        )
    if "write" in variants and "ours" in variants:
        print(f"writing (PNG + Parquet, on a writer thread) adds "
              f"{results['ours+write']['seconds'] / results['ours']['seconds'] - 1:+.1%} to ours.")  # fmt: skip
    if "fusion" in variants:
        fusion_r = results["fusion"]
        paired = fusion_r["paired_base_images_per_s"]
        print(f"fusion: {fusion_r['images_per_s'] / paired:.2f}x the base pipeline's images/s with class loads "
              f"({n * m / fusion_r['sampling_s'] / paired:.2f}x sampling only; target >= 0.80), base sampled class "
              f"by class beside it; loading a class's {args.fusion_k} image adapters "
              f"{fusion_r['mean_switch_s']:.3f} s.")  # fmt: skip
    if "reference" in variants and "ours" in variants:
        print(f"ours vs reference-style: {results['ours']['images_per_s'] / results['reference']['images_per_s']:.2f}x"
              f" the images/s; largest pixel difference (uint8) fused vs unfused: "
              f"{results['reference']['max_pixel_diff_vs_ours']}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main(parse_args())
