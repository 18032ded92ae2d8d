"""The offline proof: DataDream end to end on the tiny world (pre-trained tiny generator + CLIP, bundled digits).

Runs, in one process and on a CPU, every stage through the same entry points a user runs:

    data: the digits with a fixed validation split, the K-shot manifest (shots the tiny world never saw), the oracle
    -> stage 1 (train_datadream_lora.py) in cls and dset modes (DataDream: the paper's schedule and LoRA placement)
       and in image mode (LoFT: one LoRA per real image)
    -> stage 2 (generate_synthetic.py) with the cls adapters, the dset adapter, LoFT's fused pairs of image adapters
       and the frozen generator
    -> stage 3 (train_classifier.py) over 10 seeds: real only, and synthetic only / real + synthetic for each
       generator and for the oracle control (held-out real train images, as many per class as the synthetic sets),
       `--workers` runs at a time (one thread each)
    -> report: accuracy on the held-out real test split, every "A beats B" as the paired difference over seeds with
       its 95% interval, class fidelity, alignment, image grids, and the targets.

    python training_scripts/run_demo.py --output_dir demo_output            # `make demo`; minutes on 2 CPU cores
    python training_scripts/run_demo.py --output_dir demo_output_k4 --k 4   # the scarcer setting (README's K=4)
    python training_scripts/run_demo.py --output_dir /tmp/d --quick         # a smoke run (CI)

What is scaled from the paper for the tiny world, and why: `datadream_hf.tiny_world.recipe`. Re-running into the same
folder resumes: finished stages are skipped (each writes its outputs atomically), killed ones continue.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from generate_synthetic import main as generate_main
from generate_synthetic import parse_args as generate_args
from train_classifier import main as classifier_main
from train_classifier import parse_args as classifier_args
from train_datadream_lora import main as lora_main
from train_datadream_lora import parse_args as lora_args

from datadream_hf.data import decode_images, labels_of, load_labelled_dataset
from datadream_hf.few_shot import FewShotManifest
from datadream_hf.files import write_json_atomic
from datadream_hf.synthetic import load_synthetic_dataset
from datadream_hf.tiny_world.demo_data import DemoData, prepare_demo_data
from datadream_hf.tiny_world.recipe import TinyWorldRecipe
from datadream_hf.tiny_world.report import ORACLE, evaluate_claims, summary_markdown, write_report
from datadream_hf.tiny_world.world import tiny_world_paths
from datadream_hf.versions import library_versions

logger = logging.getLogger("datadream_hf.demo")

# Each trained generator and its stage-1 mode; the frozen generator has no adapter. The oracle (held-out real train
# images in place of synthetic ones) is the ceiling every generator is read against.
STAGE1_MODES = {"datadream_cls": "cls", "datadream_dset": "dset", "loft": "image"}
GENERATORS = (*STAGE1_MODES, "frozen")


def run_stage(out: Path, name: str, done_marker: Path, run) -> None:
    """Runs `run()` unless `done_marker` exists (a file each stage writes last, atomically), and records its wall time
    in `<output_dir>/timings.json` so a resumed demo still reports what the whole run cost."""
    if done_marker.exists():
        logger.info("%s: already done (%s), skipped", name, done_marker)
        return
    start = time.perf_counter()
    run()
    record_time(out / "timings.json", name, time.perf_counter() - start)


def record_time(path: Path, name: str, seconds: float, accumulate: bool = False) -> None:
    """Writes `name`'s seconds into the JSON file `path` (added to what is there with `accumulate`)."""
    logger.info("%s: %.1f s", name, seconds)
    timings = json.loads(path.read_text()) if path.exists() else {}
    if accumulate:
        seconds += timings.get(name, 0.0)
    write_json_atomic(path, timings | {name: round(seconds, 1)})


def stage1(out: Path, data: DemoData, generator: str, settings: TinyWorldRecipe) -> dict[str, Path]:
    adapters = {}
    for name, mode in STAGE1_MODES.items():
        output_dir = out / f"stage1_{mode}"
        flags = settings.stage1_image_flags() if mode == "image" else settings.stage1_flags()
        # dset trains one adapter on all N*K images for the same number of epochs: N times the steps of one class,
        # the same compute as cls in all (the paper's equal-compute comparison); image trains one per K-shot image.
        argv = [
            "--pretrained_model_name_or_path", generator, "--dataset", str(data.dataset),
            "--few_shot_manifest", str(data.manifest), "--dataset_preset", "digits", "--mode", mode,
            *flags, "--output_dir", str(output_dir), "--seed", "0", "--report_to", "none",
            "--resume_from_checkpoint", "latest",  # a killed demo continues
        ]  # fmt: skip
        run_stage(
            out, f"stage 1 ({mode})", output_dir / "adapter_index.json", lambda argv=argv: lora_main(lora_args(argv))
        )
        adapters[name] = output_dir
    return adapters


def stage2(out: Path, generator: str, adapters: dict, data: DemoData, settings: TinyWorldRecipe) -> dict[str, Path]:
    outputs = {}
    for name in GENERATORS:
        output_dir = out / f"stage2_{name}"
        source = ["--no_adapter", "--few_shot_manifest", str(data.manifest)] if name == "frozen" else [
            "--adapter_path", str(adapters[name])]  # fmt: skip
        fusion = ["--fusion", "pairs"] if STAGE1_MODES.get(name) == "image" else []  # LoFT: pairs of image adapters
        argv = [
            "--pretrained_model_name_or_path", generator, *source, *fusion, "--dataset_preset", "digits",
            *settings.stage2_flags(), "--batch_size", str(settings.images_per_class), "--seed", "0",
            "--output_dir", str(output_dir),
        ]  # fmt: skip
        run_stage(
            out, f"stage 2 ({name})", output_dir / "README.md", lambda argv=argv: generate_main(generate_args(argv))
        )
        outputs[name] = output_dir
    return outputs


def train_classifier_run(argv: list[str]) -> float:
    """One stage-3 run through the script's own entry point; returns its wall time (a worker of `stage3`)."""
    start = time.perf_counter()
    classifier_main(classifier_args(argv))
    return time.perf_counter() - start


def _one_thread_worker() -> None:
    # Several torch processes on few cores oversubscribe OpenMP and crawl; the tiny classifier gains nothing from
    # intra-op threads, so each worker runs one thread and the workers run side by side.
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def stage3(out: Path, clip: str, data: DemoData, training_sets: dict, settings: TinyWorldRecipe,
           workers: int = 1) -> list[dict]:  # fmt: skip
    """Every classifier run of the table, for every seed, `workers` at a time; returns one row per run and seed."""
    runs = [("real", "real", None)]
    runs += [(f"{name}/{mode}", mode, folder) for name, folder in training_sets.items()
             for mode in ("synthetic", "real+synthetic")]  # fmt: skip
    jobs = {}  # (run name, seed) -> (output dir, argv)
    for seed in settings.seeds:
        for run_name, mode, folder in runs:
            output_dir = out / "stage3" / run_name.replace("/", "__").replace("+", "_") / f"seed{seed}"
            argv = [
                "--model_name_or_path", clip, "--real_dataset", str(data.dataset),
                "--few_shot_manifest", str(data.manifest), "--validation_split", "validation",
                "--test_split", "test", "--dataset_preset", "digits", "--train_mode", mode,
                *settings.stage3_flags(), "--seed", str(seed), "--output_dir", str(output_dir), "--use_cpu",
                "--disable_tqdm", "true", "--resume_from_checkpoint", "latest",  # a killed demo continues
            ]  # fmt: skip
            if folder is not None:
                argv += ["--synthetic_dataset", str(folder)]
            jobs[(run_name, seed)] = (output_dir, argv)
    todo = {key: job for key, job in jobs.items() if not (job[0] / "report.json").exists()}
    logger.info("stage 3: %d classifier runs (%d already done), %d at a time", len(jobs), len(jobs) - len(todo),
                workers)  # fmt: skip
    run_times = out / "stage3" / "run_times.json"
    start = time.perf_counter()
    if workers > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread_worker) as pool:
            futures = {key: pool.submit(train_classifier_run, argv) for key, (_, argv) in todo.items()}
            for (run_name, seed), future in futures.items():
                record_time(run_times, f"{run_name}, seed {seed}", future.result())
    else:
        for (run_name, seed), (_, argv) in todo.items():
            record_time(run_times, f"{run_name}, seed {seed}", train_classifier_run(argv))
    if todo:  # the stage's wall clock: runs go `workers` at a time; a resumed stage adds its part
        record_time(out / "timings.json", "stage 3", time.perf_counter() - start, accumulate=True)
    results = []
    for (run_name, seed), (output_dir, _) in jobs.items():
        evaluations = json.loads((output_dir / "report.json").read_text())["evaluations"]
        results.append({"run": run_name, "seed": seed, "test": evaluations["test"]["accuracy"],
                        "validation": evaluations["validation"]["accuracy"]})  # fmt: skip
    return results


def measure_images(clip: str, data: DemoData, synthetic: dict) -> tuple[dict, dict, dict]:
    """Per generator: alignment rows (Frechet, precision, recall per class) on the pre-trained (not fine-tuned) tiny
    CLIP's normalised image features, the mean distance of its images to the nearest K-shot image of their class on
    the same features (the real test images' as the reference), and the class fidelity of its images (share read as
    the prompted digit by a probe fit on the real train split)."""
    from transformers import CLIPModel, CLIPProcessor

    from datadream_hf.tiny_world.alignment import alignment_per_class, nearest_shot_distance
    from datadream_hf.tiny_world.checks import class_fidelity, clip_image_features, fit_digit_probe

    model = CLIPModel.from_pretrained(clip, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(clip)

    train, test = (load_labelled_dataset(str(data.dataset), split=split) for split in ("train", "test"))
    test_images = decode_images(test)
    real = clip_image_features(model, processor, test_images)
    shots = FewShotManifest.load(data.manifest).select(train)
    shot_features, shot_labels = clip_image_features(model, processor, decode_images(shots)), labels_of(shots)
    probe = fit_digit_probe(decode_images(train), labels_of(train))
    rows, shot_distance, fidelity = {}, {}, {}
    for name, folder in synthetic.items():
        dataset = load_synthetic_dataset(folder).select_columns(["image", "label"])
        images, labels = decode_images(dataset), labels_of(dataset)
        features = clip_image_features(model, processor, images)
        rows[name] = alignment_per_class(real, labels_of(test), features, labels)
        shot_distance[name] = nearest_shot_distance(shot_features, shot_labels, features, labels)
        fidelity[name] = class_fidelity(probe, images, labels)
    shot_distance["real test images"] = nearest_shot_distance(shot_features, shot_labels, real, labels_of(test))
    fidelity["real test images"] = class_fidelity(probe, test_images, labels_of(test))
    return rows, shot_distance, fidelity


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = TinyWorldRecipe.quick(args.k) if args.quick else TinyWorldRecipe(k=args.k)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = tiny_world_paths() if args.generator is None or args.clip is None else None
    generator = args.generator or str(paths.generator)
    clip = args.clip or str(paths.clip)
    start = time.perf_counter()
    data = prepare_demo_data(out / "data", settings.k, settings.validation_per_class, settings.images_per_class)
    adapters = stage1(out, data, generator, settings)
    synthetic = stage2(out, generator, adapters, data, settings)
    accuracy = stage3(out, clip, data, synthetic | {ORACLE: data.oracle}, settings, args.workers)
    aligned, shot_distance, fidelity = measure_images(clip, data, synthetic)
    summary = {
        "settings": asdict(settings) | {"seeds": list(settings.seeds)},
        "class_names": load_labelled_dataset(str(data.dataset), split="train").features["label"].names,
        "accuracy": accuracy,
        "claims": evaluate_claims(accuracy),
        "alignment": aligned,
        "nearest_shot_distance": shot_distance,
        "class_fidelity": fidelity,
        "stage_times_s": json.loads((out / "timings.json").read_text()),
        "this_run_s": round(time.perf_counter() - start, 1),
        "stage3_workers": args.workers,
        "num_test": len(load_labelled_dataset(str(data.dataset), split="test")),
        "generator": generator,
        "clip": clip,
        "library_versions": library_versions(),
    }
    write_json_atomic(out / "summary.json", summary)
    report = write_report(out, summary, data, synthetic)
    print(summary_markdown(summary))
    logger.info("report: %s", report)
    return summary


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--k", type=int, default=16, help="Real images per class: 16 (default) or fewer, e.g. 4.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: every stage with a handful of steps.")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="Stage-3 classifier runs at a time, one thread each (default: one per CPU core, <= 8).",
    )
    parser.add_argument("--generator", help="Text-to-image pipeline folder or id (default: the tiny world's).")
    parser.add_argument("--clip", help="CLIP model folder or id (default: the tiny world's).")
    args = parser.parse_args(input_args)
    if not 1 <= args.k <= 16:
        parser.error(f"--k must be in 1..16 (the tiny world's held-out shots), got {args.k}.")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}.")
    return args


if __name__ == "__main__":
    main(parse_args())
