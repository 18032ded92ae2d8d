"""The offline proof: DataDream end to end on the tiny world (pre-trained tiny generator + CLIP, bundled digits).

Runs, in one process and on a CPU, every stage through the same entry points a user runs:

    K-shot manifest (K=16, seed 0, the subset the tiny world never saw)
    -> stage 1 (train_datadream_lora.py) in dset and cls modes
    -> stage 2 (generate_synthetic.py) with the cls adapters, the dset adapter and the frozen generator
    -> stage 3 (train_classifier.py): real-only, and synthetic-only / real+synthetic for each generator, over 3 seeds
    -> report: accuracy table on the held-out real test split, alignment of real vs synthetic features per class,
       image grids of real vs generated images per class.

    python training_scripts/run_demo.py --output_dir demo_output          # `make demo`; minutes on 2 CPU cores
    python training_scripts/run_demo.py --output_dir /tmp/d --quick       # a smoke run (CI)

Re-running into the same folder resumes: finished stages are skipped (each stage writes its outputs atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from generate_synthetic import main as generate_main
from generate_synthetic import parse_args as generate_args
from train_classifier import main as classifier_main
from train_classifier import parse_args as classifier_args
from train_datadream_lora import main as lora_main
from train_datadream_lora import parse_args as lora_args

from datadream_hf.data import decode_images, labels_of, load_labelled_dataset
from datadream_hf.few_shot import FewShotManifest, draw_few_shot
from datadream_hf.files import write_json_atomic
from datadream_hf.synthetic import load_synthetic_dataset
from datadream_hf.tiny_world.digits import load_digits_dataset
from datadream_hf.tiny_world.report import write_report
from datadream_hf.tiny_world.world import tiny_world_paths
from datadream_hf.versions import library_versions

logger = logging.getLogger("datadream_hf.demo")

GENERATORS = ("datadream_cls", "datadream_dset", "frozen")


@dataclass
class DemoSettings:
    """How much of each stage the demo runs. The defaults fit minutes on 2 CPU cores; `quick` fits a smoke test."""

    k: int = 16
    # The paper's cls schedule is 400 steps per class (200 epochs x 2 batches at K=16, lr 1e-4); the tiny generator
    # learns a class in fewer steps at a higher rate (tiny_world card), which keeps the demo to minutes on a CPU.
    lora_steps_per_class: int = 200
    lora_learning_rate: float = 1e-3
    images_per_class: int = 100
    num_inference_steps: int = 25
    classifier_steps: int = 300
    classifier_learning_rate: float = 1e-3
    classifier_batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(lora_steps_per_class=2, images_per_class=4, num_inference_steps=2, classifier_steps=4, seeds=(0,))


def run_stage(out: Path, name: str, done_marker: Path, run) -> None:
    """Runs `run()` unless `done_marker` exists (a file each stage writes last, atomically), and records its wall time
    in `<output_dir>/timings.json` so a resumed demo still reports what the whole run cost."""
    if done_marker.exists():
        logger.info("%s: already done (%s), skipped", name, done_marker)
        return
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    logger.info("%s: %.1f s", name, elapsed)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    write_json_atomic(timings_path, timings | {name: round(elapsed, 1)})


def prepare_data(out: Path, settings: DemoSettings) -> tuple[Path, Path]:
    data_dir, manifest_path = out / "data" / "digits", out / "data" / "few_shot.json"
    if not data_dir.exists():
        load_digits_dataset().save_to_disk(str(data_dir))
    if not manifest_path.exists():
        train = load_labelled_dataset(str(data_dir), split="train")
        draw_few_shot(train, k=settings.k, seed=0, source_name="digits", split="train").save(manifest_path)
    return data_dir, manifest_path


def stage1(out: Path, data_dir: Path, manifest: Path, generator: str, settings: DemoSettings) -> dict[str, Path]:
    adapters = {}
    for mode in ("cls", "dset"):
        output_dir = out / f"stage1_{mode}"
        # dset: the same compute as cls (S steps in all), as in the paper.
        steps = settings.lora_steps_per_class * (1 if mode == "cls" else 10)
        argv = [
            "--pretrained_model_name_or_path", generator, "--dataset", str(data_dir),
            "--few_shot_manifest", str(manifest), "--dataset_preset", "digits", "--mode", mode,
            "--resolution", "32", "--max_train_steps", str(steps), "--learning_rate", str(settings.lora_learning_rate),
            "--lr_warmup_steps", str(min(100, steps // 10)), "--checkpointing_steps", str(max(steps, 1)),
            "--output_dir", str(output_dir), "--seed", "0", "--report_to", "none",
        ]  # fmt: skip
        run_stage(
            out, f"stage 1 ({mode})", output_dir / "adapter_index.json", lambda argv=argv: lora_main(lora_args(argv))
        )
        adapters[f"datadream_{mode}"] = output_dir
    return adapters


def stage2(out: Path, generator: str, adapters: dict, manifest: Path, settings: DemoSettings) -> dict[str, Path]:
    outputs = {}
    for name in GENERATORS:
        output_dir = out / f"stage2_{name}"
        source = ["--no_adapter", "--few_shot_manifest", str(manifest)] if name == "frozen" else [
            "--adapter_path", str(adapters[name])]  # fmt: skip
        argv = [
            "--pretrained_model_name_or_path", generator, *source, "--dataset_preset", "digits",
            "--images_per_class", str(settings.images_per_class),
            "--num_inference_steps", str(settings.num_inference_steps), "--guidance_scale", "2.0",
            "--batch_size", "50", "--seed", "0", "--output_dir", str(output_dir),
        ]  # fmt: skip
        run_stage(
            out, f"stage 2 ({name})", output_dir / "README.md", lambda argv=argv: generate_main(generate_args(argv))
        )
        outputs[name] = output_dir
    return outputs


def stage3(out: Path, clip: str, data_dir: Path, manifest: Path, synthetic: dict, settings: DemoSettings) -> list:
    runs = [("real", "real", None)]
    runs += [
        (f"{name}/{mode}", mode, synthetic[name]) for name in GENERATORS for mode in ("synthetic", "real+synthetic")
    ]
    results = []
    for seed in settings.seeds:
        for run_name, mode, synthetic_dir in runs:
            output_dir = out / "stage3" / run_name.replace("/", "__").replace("+", "_") / f"seed{seed}"
            argv = [
                "--model_name_or_path", clip, "--real_dataset", str(data_dir), "--few_shot_manifest", str(manifest),
                "--dataset_preset", "digits", "--train_mode", mode, "--output_dir", str(output_dir),
                "--max_steps", str(settings.classifier_steps),
                "--learning_rate", str(settings.classifier_learning_rate),
                "--per_device_train_batch_size", str(settings.classifier_batch_size), "--augmentation", "none",
                "--eval_strategy", "steps", "--save_strategy", "steps",
                "--eval_steps", str(max(settings.classifier_steps // 3, 1)),
                "--save_steps", str(max(settings.classifier_steps // 3, 1)),
                "--warmup_steps", str(settings.classifier_steps // 10), "--seed", str(seed), "--use_cpu",
                "--disable_tqdm", "true", "--resume_from_checkpoint", "latest",  # a killed demo continues
            ]  # fmt: skip
            if synthetic_dir is not None:
                argv += ["--synthetic_dataset", str(synthetic_dir)]
            run_stage(
                out,
                f"stage 3 ({run_name}, seed {seed})",
                output_dir / "report.json",
                lambda argv=argv: classifier_main(classifier_args(argv)),
            )
            report = json.loads((output_dir / "report.json").read_text())
            results.append({"run": run_name, "seed": seed, "test": report["evaluations"]["test"]["accuracy"]})
    return results


def image_features(clip_path: str, images) -> np.ndarray:
    """Image embeddings of the pre-trained (not fine-tuned) tiny CLIP: the feature space of the alignment metrics."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_path, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_path)
    with torch.no_grad():
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return model.get_image_features(pixel_values=pixel_values).pooler_output.numpy()


def alignment(clip: str, data_dir: Path, synthetic: dict) -> tuple[dict, dict]:
    """Per generator: alignment rows (Frechet, precision, recall per class) on the tiny CLIP's image features, and the
    class fidelity of its images (share read as the prompted digit by a probe fit on the real train split)."""
    from datadream_hf.tiny_world.alignment import alignment_per_class
    from datadream_hf.tiny_world.checks import class_fidelity, fit_digit_probe

    train, test = (load_labelled_dataset(str(data_dir), split=split) for split in ("train", "test"))
    test_images = decode_images(test)
    real = image_features(clip, test_images)
    probe = fit_digit_probe(decode_images(train), labels_of(train))
    rows, fidelity = {}, {}
    for name, folder in synthetic.items():
        dataset = load_synthetic_dataset(folder).select_columns(["image", "label"])
        images, labels = decode_images(dataset), labels_of(dataset)
        rows[name] = alignment_per_class(real, labels_of(test), image_features(clip, images), labels)
        fidelity[name] = class_fidelity(probe, images, labels)
    fidelity["real test images"] = class_fidelity(probe, test_images, labels_of(test))
    return rows, fidelity


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.generator is None or args.clip is None:
        paths = tiny_world_paths()
    generator = args.generator or str(paths.generator)
    clip = args.clip or str(paths.clip)
    data_dir, manifest = prepare_data(out, settings)
    adapters = stage1(out, data_dir, manifest, generator, settings)
    synthetic = stage2(out, generator, adapters, manifest, settings)
    accuracy = stage3(out, clip, data_dir, manifest, synthetic, settings)
    aligned, fidelity = alignment(clip, data_dir, synthetic)
    summary = {
        "settings": settings.__dict__ | {"seeds": list(settings.seeds)},
        "class_names": FewShotManifest.load(manifest).class_names,
        "accuracy": accuracy,
        "alignment": aligned,
        "class_fidelity": fidelity,
        "stage_times_s": json.loads((out / "timings.json").read_text()),
        "library_versions": library_versions(),
    }
    write_json_atomic(out / "summary.json", summary)
    write_report(out, summary, data_dir, manifest, synthetic)
    logger.info("report: %s", out / "report.md")
    return summary


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--quick", action="store_true", help="A smoke run: every stage with a handful of steps.")
    parser.add_argument("--generator", help="Text-to-image pipeline folder or id (default: the tiny world's).")
    parser.add_argument("--clip", help="CLIP model folder or id (default: the tiny world's).")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
