"""Real-size shapes on a CPU, without weights: stage 1 for one step and stage 2 for one image per class with a
generator of a released model's architecture and random weights (`datadream_hf.tiny_world.benchmarking`:
`random-sd21-base`, `random-sdxl-base`, `random-sd3-medium`), printing each stage's wall time and peak resident memory.

Each stage is its own process (`training_scripts/`, the commands a user runs), so a peak is that stage's alone; the
model is built and saved in a process of its own first. Stage 1 trains `--mode` (dset: one adapter; cls: 2 classes on
the grouped engine, sized by the memory probe) at batch 1 and fp32 on 2 classes of the bundled digits; stage 2 makes
one image per class with 1 sampling step (guidance 2.0: a conditional and an unconditional pass).

    python benchmarks/bench_real_size_cpu.py --model random-sdxl-base --resolution 512

`make real-size-cpu` runs the three families at the resolutions that fit this machine's 24 GiB (the README's
"Generators" section has the figures); not part of `make test` (minutes and most of the RAM per family).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datadream_hf.tiny_world.benchmarking import RANDOM_GENERATORS

SCRIPTS = Path(__file__).resolve().parent.parent / "training_scripts"
# Runs a script as `python script args` would, then reports the process's peak resident memory on stderr's last line.
PEAK_WRAPPER = (
    "import json, resource, runpy, sys\n"
    "script = sys.argv[1]\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(script, run_name='__main__')\n"
    "finally:\n"
    "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
    "    print(json.dumps({'peak_rss_bytes': peak}), file=sys.stderr)\n"
)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stage 1 (1 step) and stage 2 (1 image) at real size on the CPU.")
    parser.add_argument("--model", choices=sorted(RANDOM_GENERATORS), default="random-sdxl-base")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--mode", choices=("dset", "cls"), default="dset")
    parser.add_argument("--work_dir", default=None, help="Keep the model and outputs here (default: a temp folder).")
    return parser.parse_args(input_args)


def run_stage(name: str, argv: list[str]) -> dict:
    """Runs one stage in a fresh process; returns its wall time and peak resident memory."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    peak = json.loads(result.stderr.strip().splitlines()[-1])["peak_rss_bytes"]
    print(f"  {name}: {seconds:7.1f} s, peak resident memory {peak / 2**30:5.2f} GiB", flush=True)
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 2)}


def main(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data, manifest = work / args.model, work / "digits", work / "few_shot.json"
    print(f"{args.model} at {args.resolution} px, stage 1 --mode {args.mode}, CPU fp32, in {work}", flush=True)
    results = {"model": args.model, "resolution": args.resolution, "mode": args.mode}
    if not (model / "model_index.json").exists():
        build = work / "build_model.py"
        build.write_text("from datadream_hf.tiny_world.benchmarking import save_random_generator\n"
                         f"save_random_generator({args.model!r}, {str(model)!r}, device='cpu')\n")  # fmt: skip
        results["build"] = run_stage("build + save", [str(build)])
    if not manifest.exists():
        from datadream_hf.tiny_world.digits import load_digits_dataset

        load_digits_dataset()["train"].save_to_disk(str(data))
        subprocess.run([sys.executable, "-m", "datadream_hf.cli", "few-shot", "--dataset", str(data), "--class_names",
                        "zero,one", "--k", "2", "--seed", "0", "--output", str(manifest)], check=True)  # fmt: skip
    adapters = work / f"stage1-{args.mode}-{args.resolution}"
    results["stage 1"] = run_stage("stage 1, 1 step", [
        str(SCRIPTS / "train_datadream_lora.py"), "--pretrained_model_name_or_path", str(model), "--dataset",
        str(data), "--few_shot_manifest", str(manifest), "--mode", args.mode, "--resolution", str(args.resolution),
        "--train_batch_size", "1", "--max_train_steps", "1", "--lr_warmup_steps", "0", "--output_dir", str(adapters),
        "--seed", "0",
    ])  # fmt: skip
    results["stage 2"] = run_stage("stage 2, 1 image per class", [
        str(SCRIPTS / "generate_synthetic.py"), "--pretrained_model_name_or_path", str(model), "--adapter_path",
        str(adapters), "--images_per_class", "1", "--num_inference_steps", "1", "--batch_size", "1", "--resolution",
        str(args.resolution), "--output_dir", str(work / f"stage2-{args.mode}-{args.resolution}"), "--seed", "0",
    ])  # fmt: skip
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(parse_args())
