"""Stage 1 of DataDream: LoRA-adapt Stable Diffusion on K real images per class (an adapter per class, or one for all).

Draw the K-shot subset once (every stage reads the same manifest), then train. SD 2.1-base, FGVC-Aircraft, 16 shots,
the paper's settings (rank 16, AdamW 1e-4, batch 8, 200 epochs), one adapter per class, classes split over 8 GPUs:

    datadream-hf few-shot --dataset <aircraft dataset id> --dataset_preset fgvc_aircraft --output aircraft_16shot.json
    accelerate launch --num_processes 8 training_scripts/train_datadream_lora.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \
        --dataset <aircraft dataset id> --split train --few_shot_manifest aircraft_16shot.json \
        --dataset_preset fgvc_aircraft --mode cls --output_dir datadream-aircraft-cls \
        --mixed_precision fp16 --checkpointing_steps 100 --resume_from_checkpoint latest

The manifest gives the classes, their order and their names (the preset's curated names: `Boeing 717`, not a Hub
copy's raw label); `--dataset_preset` also sets the prompts' domain word and the Hub copy's columns and split.
(`stabilityai/stable-diffusion-2-1-base` was removed from the Hub in 2025: pass a mirror's id or a local copy, and
`--revision` to pin it.) One adapter for the whole dataset (DataDream_dset), batches split over the processes:

    accelerate launch --num_processes 8 training_scripts/train_datadream_lora.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \
        --dataset <aircraft dataset id> --few_shot_manifest aircraft_16shot.json --dataset_preset fgvc_aircraft \
        --mode dset --output_dir datadream-aircraft-dset --mixed_precision fp16 \
        --push_to_hub --hub_model_id <user>/datadream-aircraft-dset

LoFT (one adapter per K-shot image, LoFT's settings as defaults: rank 2 on the UNet only, batch 1, 600 steps, lr 1e-3,
10 warm-up steps, center crop; any flag given wins), trained many images at a time on the grouped engine:

    accelerate launch training_scripts/train_datadream_lora.py \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \
        --dataset <aircraft dataset id> --few_shot_manifest aircraft_16shot.json --dataset_preset fgvc_aircraft \
        --mode image --output_dir loft-aircraft --mixed_precision fp16 --resume_from_checkpoint latest

Offline plumbing check on the tiny test models and the bundled digits (CPU, seconds). The tiny test models have RANDOM
weights: they learn nothing. For offline runs that mean something, use the tiny world's pre-trained generator
(`datadream-hf tiny-world` prints its folder; in Python `datadream_hf.tiny_world.world.tiny_world_paths().generator`):

    datadream-hf tiny-models --output_dir models && datadream-hf digits --output_dir digits
    datadream-hf few-shot --dataset digits --k 4 --output digits_4shot.json
    python training_scripts/train_datadream_lora.py --pretrained_model_name_or_path models/tiny-sd \
        --dataset digits --few_shot_manifest digits_4shot.json --resolution 32 --max_train_steps 4 --output_dir out

Outputs: `pytorch_lora_weights.safetensors` (top level in dset mode, one `<index>_<class>/` folder per class in cls
mode, one `<index>_<class>/image_<row>/` folder per K-shot image in image mode, each loadable with
`StableDiffusionPipeline.load_lora_weights`) with its `training_log.json` (loss and lr at every step),
`adapter_index.json`, `datadream_config.json` and a model card. With `--report_to`, trackers run on the main process;
in a multi-process cls run its TensorBoard also gets the other processes' classes (their training logs and validation
samples) at the end. A run is deterministic under `--seed`: a resumed run ends with the same adapters
and logs as an uninterrupted one.

cls mode trains several classes per forward pass by default (`--cls_strategy auto`, each sample routed to its class's
LoRA): a probe of a one- and a two-class step sizes the groups to the free GPU memory (CPU: RAM), keeping
`--memory_safety_margin` free; the size and why are logged and recorded in `datadream_config.json`, and
`--classes_per_group N` forces one. A group that runs out of GPU memory is halved and continues from its last
checkpoint. Adapters equal the sequential ones up to float rounding, which depends on how classes are grouped;
`--cls_strategy sequential` trains one class after the other and gives class i the same bits whatever the number of
processes or the memory. A run may be resumed with another strategy: every class continues from its own latest
checkpoint. `--cache_latents` (on by default) encodes each few-shot crop once instead of at every step. Speed against
the reference's way: `benchmarks/bench_stage1_cls.py`.

Every flag is a field of `GeneratorTrainingConfig` or `AdapterHubArguments` (`datadream_hf.adapt.config`, where their
help and checks live). A JSON or YAML file of them can stand for the flags: `train_datadream_lora.py stage1.yaml`.
Bad input (a missing path, fp16 on a CPU, ...) stops the script with one line naming it; `--debug` adds the traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from datadream_hf.adapt.config import AdapterHubArguments, GeneratorTrainingConfig
from datadream_hf.adapt.data import load_few_shot_data
from datadream_hf.adapt.outputs import push_adapters_to_hub
from datadream_hf.adapt.train import train_generator
from datadream_hf.arguments import ScriptArgumentParser
from datadream_hf.console import setup_script_console
from datadream_hf.distributed import process_group_kwargs
from datadream_hf.errors import run_script
from datadream_hf.files import check_output_path
from datadream_hf.guardrails import refuse_fp16_on_cpu
from datadream_hf.hub import check_push_access
from datadream_hf.sources import STAGE1_FOLDER, check_output_apart


def parse_args(input_args: list[str] | None = None) -> tuple[GeneratorTrainingConfig, AdapterHubArguments]:
    parser = ScriptArgumentParser(
        (GeneratorTrainingConfig, AdapterHubArguments),
        description="DataDream stage 1: LoRA-adapt Stable Diffusion on few-shot data.",
        defaults={"mixed_precision": None},  # Accelerate decides (`accelerate launch --mixed_precision`, its config)
        comma_separated=("class_names",),
        negatable=("train_text_encoder", "cache_latents", "center_crop"),
    )
    return parser.parse(input_args)


def main(args: tuple[GeneratorTrainingConfig, AdapterHubArguments]) -> None:
    config, hub = args
    setup_script_console(libraries=("datasets", "diffusers", "huggingface_hub", "transformers"))
    # 1. Accelerate (CPU-only machines need cpu=True to start several processes); the config takes its precision.
    #    fp16 on a CPU is refused first (the flag, or `accelerate launch --mixed_precision fp16`): slow and pointless.
    precision = config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    refuse_fp16_on_cpu(precision, device, "--mixed_precision fp16 (flag or accelerate launch)", "Pass no (or bf16).")
    output_dir = check_output_path(config.output_dir, "--output_dir")  # a file in the way, no write permission
    check_output_apart(output_dir, STAGE1_FOLDER, {"--dataset": config.dataset})  # not into the images it reads
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        log_with=config.report_to,
        kwargs_handlers=[process_group_kwargs(config.ddp_timeout)],  # explicit: NCCL's own is 10 minutes
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
        ),
    )
    config = dataclasses.replace(config, mixed_precision=accelerator.mixed_precision)
    # An upload that would fail after training (offline, no token, no write access) fails now; the repo is created.
    if hub.push_to_hub:
        check_push_access(hub.hub_model_id or output_dir.resolve().name, hub.hub_token, private=hub.hub_private,
                          main_process=accelerator.is_main_process)  # fmt: skip

    # 2. The K-shot images the manifest picks (a missing column or corrupt image fails here, before any model load).
    data = load_few_shot_data(config)
    if accelerator.is_main_process and config.report_to:
        scalars = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("datadream-lora", config=scalars)

    # 3. Train: the base model is loaded once per process; cls mode gives class i to process i % num_processes.
    train_generator(config, data, accelerator)

    # 4. Push the finished folder (index, run config, card, adapters; checkpoints stay local): main process only, after
    #    the last collective, so no process waits on the upload.
    if hub.push_to_hub and accelerator.is_main_process:
        repo_id = hub.hub_model_id or output_dir.resolve().name
        url = push_adapters_to_hub(output_dir, repo_id, token=hub.hub_token, private=hub.hub_private)
        logging.getLogger(__name__).info("Pushed to %s", url)
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main, parse_args)
