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

Offline, on the tiny test model (CPU, seconds), after stage 1 wrote `out`:

    python training_scripts/generate_synthetic.py --pretrained_model_name_or_path models/tiny-sd \
        --adapter_path out --images_per_class 4 --num_inference_steps 3 --output_dir synthetic

Outputs: Parquet shards under `shards/` (PNG bytes + per-image seed and prompt), `generation_config.json`,
`generation_manifest.json`, `sample_grid.png` and a dataset card `README.md`. Load the result with
`datadream_hf.synthetic.load_synthetic_dataset(output_dir)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys

import torch
import transformers
from accelerate import PartialState

from datadream_hf.few_shot import FewShotManifest
from datadream_hf.generate.config import GenerationConfig
from datadream_hf.generate.dataset import push_synthetic_dataset_to_hub, save_synthetic_dataset, write_dataset_card
from datadream_hf.generate.run import generate_synthetic_dataset
from datadream_hf.prompts import DEFAULT_TEMPLATE, PromptTemplate

HELP = {f.name: f.metadata.get("help") for f in dataclasses.fields(GenerationConfig)}
DEFAULTS = GenerationConfig()
MIXED_PRECISION_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DataDream stage 2: generate the synthetic dataset.")

    def add(name: str, **kwargs):
        kwargs.setdefault("default", getattr(DEFAULTS, name, None))
        kwargs["help"] = kwargs.get("help") or HELP.get(name)
        parser.add_argument(f"--{name}", **kwargs)

    # Model and adapters
    add("pretrained_model_name_or_path", type=str, required=True, help="The base model stage 1 was trained on.")
    add("revision", type=str, help="Base model revision.")
    add("variant", type=str, help="Base model weights variant, e.g. fp16.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter_path", type=str, help="Stage-1 --output_dir, or the Hub repo id it was pushed to.")
    source.add_argument("--no_adapter", action="store_true", help=HELP["no_adapter"])
    add("adapter_revision", type=str, help="Hub revision of --adapter_path.")
    add(
        "allow_base_model_mismatch",
        action="store_true",
        default=False,
        help="Skip the base-model id check (e.g. a local copy of the model stage 1 used); shapes are still checked.",
    )
    # Classes and prompts (taken from stage 1 when available)
    add("class_names", type=str, help="Comma-separated classes; needed with --no_adapter unless --few_shot_manifest.")
    add("few_shot_manifest", type=str, help="K-shot manifest to read the class names from (with --no_adapter).")
    add("dataset_preset", type=str, help="Domain word preset, e.g. fgvc_aircraft; default: stage 1's template.")
    add("domain", type=str, help="Domain word with its trailing space, e.g. 'aircraft '; overrides the preset.")
    add("prompt_template", type=str, help=f"Prompt template (default: stage 1's, else {DEFAULT_TEMPLATE!r}).")
    add("clean_class_names", action="store_true", default=False, help="Replace '_' by ' ' in class names.")
    # Sampling
    for name in ("images_per_class", "num_inference_steps", "batch_size", "shard_size", "seed", "resolution"):
        add(name, type=int)
    add("guidance_scale", type=float)
    add("scheduler", type=str)
    add("dtype", type=str, choices=["auto", "float32", "float16", "bfloat16"])
    add("mixed_precision", type=str, choices=list(MIXED_PRECISION_DTYPES), help="Alias of --dtype (no/fp16/bf16).")
    # Outputs
    add("output_dir", type=str, default="datadream-synthetic")
    add("save_to_disk", type=str, help="Also write the built dataset with `save_to_disk` to this folder.")
    add("dataset_license", type=str, default="other", help="License of the base model, e.g. openrail++ for SD 2.1.")
    add("push_to_hub", action="store_true", default=False)
    add("hub_dataset_id", type=str, help="Dataset repo to push to, e.g. <user>/datadream-aircraft.")
    add("hub_token", type=str, help="Hub token (default: the logged-in one); never written anywhere.")
    add("hub_private", action="store_true", default=False)
    args = parser.parse_args(input_args)
    if args.push_to_hub and not args.hub_dataset_id:
        parser.error("--push_to_hub needs --hub_dataset_id.")
    if args.mixed_precision is not None:
        if args.dtype not in ("auto", MIXED_PRECISION_DTYPES[args.mixed_precision]):
            parser.error(f"--mixed_precision {args.mixed_precision} contradicts --dtype {args.dtype}.")
        args.dtype = MIXED_PRECISION_DTYPES[args.mixed_precision]
    return args


def prompt_template_from_args(args: argparse.Namespace) -> PromptTemplate | None:
    """A template only if the user asked for one; otherwise stage 1's is used (see `resolve_prompt_template`)."""
    if args.dataset_preset is None and args.domain is None and args.prompt_template is None:
        return None
    kwargs = {"template": args.prompt_template or DEFAULT_TEMPLATE, "clean_class_names": args.clean_class_names}
    if args.domain is not None:
        return PromptTemplate(domain=args.domain, **kwargs)
    if args.dataset_preset is not None:
        return PromptTemplate.from_preset(args.dataset_preset, **kwargs)
    return PromptTemplate(**kwargs)


def class_names_from_args(args: argparse.Namespace) -> list[str] | None:
    if args.class_names:
        return [name.strip() for name in args.class_names.split(",")]
    if args.few_shot_manifest:
        return FewShotManifest.load(args.few_shot_manifest).class_names
    return None


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.disable_progress_bar()  # else a "Loading weights" bar at every adapter switch
    state = PartialState(cpu=not torch.cuda.is_available())

    # 1. Configuration: every check runs before the first image.
    config = GenerationConfig(
        images_per_class=args.images_per_class,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        seed=args.seed,
        resolution=args.resolution,
        no_adapter=args.no_adapter,
    )
    # The token is masked in the recorded command however it was passed (`--hub_token X`, `--hub_token=X`, ...).
    argv = ["<hub_token>" if args.hub_token and args.hub_token in a else a for a in sys.argv]

    # 2. Generation (resumes from the finished shards in --output_dir).
    generate_synthetic_dataset(
        args.output_dir,
        args.pretrained_model_name_or_path,
        config,
        adapter_path=args.adapter_path,
        class_names=class_names_from_args(args),
        prompt_template=prompt_template_from_args(args),
        revision=args.revision,
        variant=args.variant,
        adapter_revision=args.adapter_revision,
        token=args.hub_token,
        allow_base_model_mismatch=args.allow_base_model_mismatch,
        state=state,
        command=shlex.join(["python", *argv]),
    )

    # 3. The dataset: card, optional save_to_disk copy, optional Hub upload (Parquet).
    if state.is_main_process:
        write_dataset_card(args.output_dir, license=args.dataset_license, repo_id=args.hub_dataset_id)
        if args.save_to_disk:
            save_synthetic_dataset(args.output_dir, args.save_to_disk)
        if args.push_to_hub:
            push_synthetic_dataset_to_hub(
                args.output_dir,
                args.hub_dataset_id,
                license=args.dataset_license,
                token=args.hub_token,
                private=args.hub_private,
            )
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
