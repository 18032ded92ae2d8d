"""Stage 2 of DataDream: generate the synthetic dataset with the stage-1 adapters (or the frozen base model).

SD 2.1-base with the per-class adapters of stage 1, the reference's settings (500 images per class, 50 PNDM steps,
guidance 2.0, fp16), split over 8 GPUs; a killed run resumes from its finished shards when re-run unchanged:

    accelerate launch --num_processes 8 training_scripts/generate_synthetic.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \
        --adapter_path datadream-aircraft-cls --output_dir synthetic-aircraft-cls \
        --images_per_class 500 --num_inference_steps 50 --guidance_scale 2.0 --dtype float16 --batch_size 16 \
        --push_to_hub --hub_dataset_id <user>/datadream-aircraft-synthetic --dataset_license openrail++

(`stabilityai/stable-diffusion-2-1-base` was removed from the Hub in 2025: pass the mirror or local copy that stage 1
used.) `--adapter_path` also takes the Hub repo id stage 1 pushed to. The frozen-generator ("FakeIt") baseline with
the same prompts:

    accelerate launch --num_processes 8 training_scripts/generate_synthetic.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base --no_adapter \
        --few_shot_manifest aircraft_16shot.json --dataset_preset fgvc_aircraft \
        --output_dir synthetic-aircraft-frozen --dtype float16

LoFT: from the per-image adapters of `train_datadream_lora.py --mode image`, each image fuses a pair of its class's
adapters (every pair of the class in a seeded shuffle, cycled; several pairs per batched UNet call):

    accelerate launch --num_processes 8 training_scripts/generate_synthetic.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \
        --adapter_path loft-aircraft-image --fusion pairs --fusion_weights 0.5 0.5 \
        --output_dir synthetic-aircraft-loft --dtype float16 --batch_size 16

Offline plumbing check on the tiny test model (RANDOM weights: for meaningful images pass the tiny world's pre-trained
generator, `datadream-hf tiny-world` prints its folder), after stage 1 wrote `out` (CPU, seconds):

    python training_scripts/generate_synthetic.py --pretrained_model_name_or_path models/tiny-sd \
        --adapter_path out --images_per_class 4 --num_inference_steps 3 --output_dir synthetic

Outputs: Parquet shards under `shards/` (PNG bytes + per-image seed and prompt), `generation_config.json`,
`generation_manifest.json`, `sample_grid.png` and a dataset card `README.md`. Load the result with
`datasets.load_dataset(output_dir, split="train")` (Image + ClassLabel, read from the shards through the card's YAML)
or `datadream_hf.load_synthetic_dataset(output_dir)` (plus the per-class provenance columns); `load_from_disk` does
not apply to the folder (`--save_to_disk DIR` also writes a `save_to_disk` copy).

Every flag is a field of `GenerationArguments` or `GenerationConfig` (`datadream_hf.generate.config`, where their help
and checks live). A JSON or YAML file of them can stand for the flags: `generate_synthetic.py stage2.yaml`.
Bad input (a missing path, fp16 on a CPU, ...) stops the script with one line naming it; `--debug` adds the traceback.
"""

from __future__ import annotations

import shlex
import sys

import transformers

from datadream_hf.arguments import ScriptArgumentParser
from datadream_hf.console import setup_script_console
from datadream_hf.distributed import process_state
from datadream_hf.errors import run_script
from datadream_hf.files import check_output_path
from datadream_hf.generate.config import GenerationArguments, GenerationConfig
from datadream_hf.generate.dataset import push_synthetic_dataset_to_hub, save_synthetic_dataset
from datadream_hf.generate.run import generate_synthetic_dataset
from datadream_hf.hub import check_push_access


def parse_args(input_args: list[str] | None = None) -> tuple[GenerationArguments, GenerationConfig]:
    parser = ScriptArgumentParser(
        (GenerationArguments, GenerationConfig),
        description="DataDream stage 2: generate the synthetic dataset.",
        comma_separated=("class_names",),
    )
    return parser.parse(input_args)


def main(args: tuple[GenerationArguments, GenerationConfig]) -> None:
    generation, config = args
    setup_script_console(libraries=("datasets", "diffusers", "huggingface_hub", "transformers"))
    transformers.utils.logging.disable_progress_bar()  # else a "Loading weights" bar at every adapter switch
    state = process_state(generation.ddp_timeout)  # explicit: NCCL's own is 10 minutes

    # 1. Configuration: every check ran when the arguments were parsed, or runs before the first image. The token is
    #    masked in the recorded command however it was passed (`--hub_token X`, `--hub_token=X`, ...).
    token = generation.hub_token
    argv = ["<hub_token>" if token and token in a else a for a in sys.argv]
    #    A --save_to_disk folder that cannot be written, and an upload that would fail after generating (offline, no
    #    token, no write access), fail now.
    if generation.save_to_disk:
        check_output_path(generation.save_to_disk, "--save_to_disk")
    if generation.push_to_hub:
        check_push_access(generation.hub_dataset_id, token, repo_type="dataset", private=generation.hub_private,
                          main_process=state.is_main_process)  # fmt: skip

    # 2. Generation (resumes from the finished shards in --output_dir).
    generate_synthetic_dataset(generation, config, state=state, command=shlex.join(["python", *argv]))

    # 3. The dataset (its card written by the run): optional save_to_disk copy, optional Hub upload (Parquet). Main
    #    process only, after the last collective: the others have left and wait on no copy or upload (15-20 GB of
    #    PNG for 500 images x 100 classes), which NCCL's timeout would otherwise abort.
    if state.is_main_process:
        if generation.save_to_disk:
            save_synthetic_dataset(generation.output_dir, generation.save_to_disk)
        if generation.push_to_hub:
            push_synthetic_dataset_to_hub(
                generation.output_dir,
                generation.hub_dataset_id,
                license=generation.dataset_license,
                token=token,
                private=generation.hub_private,
            )
    state.destroy_process_group()


if __name__ == "__main__":
    run_script(main, parse_args)
