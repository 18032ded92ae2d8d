"""Stage 2 of DataDream, whole: `generate_synthetic_dataset` checks every input, loads one pipeline, splits the
unfinished shards across processes and writes the generation folder (`synthetic`), resuming a killed run and refusing
one with other settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from ..distributed import process_state
from ..families import read_family
from ..files import check_output_path, write_json_atomic
from ..guardrails import native_resolution, refuse_fp16_on_cpu, warn_far_resolution
from ..prompts import PromptTemplate
from ..run_folder import TRAINING_CONFIG_NAME, OutputDirLock, OutputDirLockedError, settings_diff
from ..sources import STAGE2_FOLDER, check_output_apart, check_source
from ..synthetic import (
    GENERATION_CONFIG_NAME,
    GENERATION_MANIFEST_NAME,
    SHARDS_DIR,
    Shard,
    is_shard_finished,
    plan_shards,
    remove_stale_temp_files,
)
from ..versions import library_versions
from .adapters import (
    AdapterSet,
    check_adapter_family,
    check_adapters_fit,
    check_base_model_id,
    check_class_names,
    resolve_adapters,
)
from .config import DTYPES, GenerationArguments, GenerationConfig, GenerationInputError
from .dataset import write_dataset_card, write_sample_grid
from .fusion import check_fusion
from .sampling import SyntheticImageSampler, load_generation_pipeline
from .shards import generate_shards, split_work

logger = logging.getLogger(__name__)

GENERATION_FORMAT_VERSION = 1
FUSION_PAIRS_DERIVATION = (
    "per class, itertools.combinations of its image adapters (adapter_index.json order), permuted by "
    "numpy.random.default_rng([seed, class_index]); image k uses pair k % number of pairs"
)


def resolve_prompt_template(prompt_template: PromptTemplate | None, adapters: AdapterSet) -> PromptTemplate:
    """The caller's template if given, else stage 1's (so generation prompts equal training prompts), else default."""
    trained = adapters.training_config.get("prompt_template")
    if prompt_template is None:
        if not trained:
            return PromptTemplate()
        try:
            return PromptTemplate(**trained)
        except TypeError as err:
            raise GenerationInputError(
                f"`prompt_template` in the stage-1 {TRAINING_CONFIG_NAME} is malformed ({trained!r}): {err}."
            ) from err
    if trained and prompt_template.to_dict() != trained:
        logger.warning(
            f"Prompt template {prompt_template.to_dict()} differs from the one stage 1 trained with {trained}."
        )
    return prompt_template


def _identity(run_info: dict) -> dict:
    """The part of a run's description that determines its images (what resuming must match)."""
    return {
        "base_model": run_info["base_model"],
        "adapters": {
            "mode": run_info["adapters"]["mode"],
            "sha256": [a["sha256"] for a in run_info["adapters"]["per_class"]],
        },
        "class_names": run_info["class_names"],
        "prompts": run_info["prompts"],
        "generation": run_info["generation"],
        "scheduler_class": run_info["scheduler_class"],
    }


def describe_run(sampler: SyntheticImageSampler, base_model: dict, dtype: str, command: str | None = None) -> dict:
    """The content of `generation_config.json`: everything that made the images, plus a fingerprint of it."""
    generation = sampler.config.to_dict()
    generation.update(dtype=dtype, resolution=sampler.resolution, no_adapter=sampler.adapters.mode == "none")
    info = {
        "format_version": GENERATION_FORMAT_VERSION,
        "base_model": base_model,
        "adapters": sampler.adapters.describe(),
        "class_names": sampler.adapters.class_names,
        "prompt_template": sampler.prompt_template.to_dict(),
        "prompts": sampler.prompts,
        "generation": generation,
        "scheduler_class": type(sampler.pipeline.scheduler).__name__,
        "seed_derivation": "numpy SeedSequence([seed, class_index, image_index]) -> 62-bit torch CPU generator seed",
        # The K-shot draw the adapters learned from (stage 1's record): stage 3 refuses these images beside another.
        "few_shot": sampler.adapters.training_config.get("few_shot"),
        **({"fusion_pairs": FUSION_PAIRS_DERIVATION} if sampler.fusion is not None else {}),
        "library_versions": library_versions(),
        "command": command,
    }
    canonical = json.dumps(_identity(info), sort_keys=True)
    info["fingerprint"] = hashlib.sha256(canonical.encode()).hexdigest()
    return info


def check_output_dir(output_dir: str | Path, run_info: dict) -> bool:
    """Refuses to resume into a folder that holds a run with other settings (its shards would be mixed in). Returns
    True when that run never finished a shard (e.g. it ran out of memory at its first batch): this run replaces it."""
    path = Path(output_dir) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return False
    try:
        previous = json.loads(path.read_text())
        if previous.get("fingerprint") == run_info["fingerprint"]:
            return False
        names, params = previous["class_names"], previous["generation"]
        plan = plan_shards(len(names), params["images_per_class"], params["shard_size"])
        if not any(is_shard_finished(output_dir, s, names, previous["fingerprint"]) for s in plan):
            return True
        old, new = _identity(previous), _identity(run_info)
    except (json.JSONDecodeError, KeyError) as err:
        raise GenerationInputError(f"{str(path)!r} is unreadable ({err}); use a new --output_dir.") from err
    differences = [
        f"{setting}: {a!r} -> {b!r}" if "." in setting else f"{setting}: {str(a)[:80]} -> {str(b)[:80]}"
        for setting, (a, b) in settings_diff(old, new).items()
    ]
    raise GenerationInputError(
        f"{str(output_dir)!r} holds a generation run with other settings ({'; '.join(differences)}). Re-run with the "
        "same arguments to resume it, or choose a new --output_dir."
    )


def _gather_unfinished(output_dir: Path, share: list[Shard], run_info: dict, state) -> set[Shard]:
    """The unfinished shards of every process's `share`, each process hashing its own (a collective: every process
    calls it and gets the union)."""
    from accelerate.utils import gather_object

    names, fingerprint = run_info["class_names"], run_info["fingerprint"]
    unfinished = [s for s in share if not is_shard_finished(output_dir, s, names, fingerprint)]
    return set(gather_object(unfinished) if state.num_processes > 1 else unfinished)


def generate_synthetic_dataset(
    args: GenerationArguments,
    config: GenerationConfig,
    state=None,
    command: str | None = None,
    on_shard_written: Callable[[Shard, Path], None] | None = None,
) -> dict:
    """Runs stage 2 into `args.output_dir` (resuming a killed run) and returns the run description.

    Args:
        args: the base model, the adapters (`adapter_path`, or `no_adapter` with the classes), prompts, output folder.
        config: how to sample.
        state: an `accelerate.PartialState`; the shards are split across its processes.
        command: the command line to record (the script's, its token masked).
        on_shard_written: called after each finished shard (tests use it to stop a run midway).

    With several processes, the others return once every shard is written and checked; the main process then writes
    the run manifest, sample grid and card (and the script uploads), with no process waiting on it at a collective.
    """
    from accelerate.utils import broadcast_object_list

    state = state or process_state(args.ddp_timeout)
    output_dir, model, revision = args.output_dir, args.pretrained_model_name_or_path, args.revision
    # 1. Validate everything before the first image (`args` checked adapter_path / no_adapter / classes).
    check_output_path(output_dir, "--output_dir")  # a file in the way, no write permission
    check_output_apart(output_dir, STAGE2_FOLDER, {"--adapter_path": args.adapter_path})
    check_source(
        model, "--pretrained_model_name_or_path", required="model_index.json", expected="a diffusers pipeline"
    )
    dtype = config.resolved_dtype(state.device)
    refuse_fp16_on_cpu(
        dtype, state.device, "--dtype float16 (or --mixed_precision fp16)", "Leave --dtype auto (float32 on a CPU)."
    )
    class_names = args.requested_class_names()
    if args.no_adapter:
        adapters = AdapterSet.none(class_names)
    else:
        adapters = resolve_adapters(args.adapter_path, revision=args.adapter_revision, token=args.hub_token)
    check_class_names(adapters, class_names)
    check_fusion(adapters, config)
    template = resolve_prompt_template(args.requested_prompt_template(), adapters)
    if args.clean_class_names and not template.clean_class_names:  # alone, it asks for stage 1's template, cleaned
        template = resolve_prompt_template(dataclasses.replace(template, clean_class_names=True), adapters)
    template.check_distinct(adapters.class_names)  # classes whose prompts are one cannot be told apart
    # The recorded base model id and family are checked before the (slow) pipeline load; the weight shapes after it.
    check_adapter_family(adapters, read_family(model, revision))
    check_base_model_id(adapters, model, revision, args.allow_base_model_mismatch)
    pipeline = load_generation_pipeline(
        model, revision=revision, variant=args.variant, torch_dtype=DTYPES[dtype], scheduler=config.scheduler
    )
    check_adapters_fit(pipeline, adapters, model, revision, args.allow_base_model_mismatch)
    sampler = SyntheticImageSampler(pipeline.to(state.device), adapters, template, config)
    if state.is_main_process and config.resolution is not None:
        warn_far_resolution(config.resolution, native_resolution(sampler.denoiser, pipeline.vae_scale_factor))
    base_model = {"pretrained_model_name_or_path": model, "revision": revision, "variant": args.variant}
    run_info = describe_run(sampler, base_model, dtype, command=command)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, run_info)
    state.wait_for_everyone()

    # 2. The main process locks the folder and sets it up; then every process hashes its share of the finished
    #    shards (15-20 GB of PNG in a full run: one process alone would keep the others waiting at a collective).
    lock, setup = OutputDirLock(output_dir), None
    if state.is_main_process:
        try:
            lock.acquire()
            # Again: another run may have started since the check above.
            if check_output_dir(output_dir, run_info):
                logger.info(f"Replacing the run in {output_dir}, which never finished a shard.")
                shutil.rmtree(output_dir / SHARDS_DIR, ignore_errors=True)
            write_json_atomic(output_dir / GENERATION_CONFIG_NAME, run_info)
            for tmp in remove_stale_temp_files(output_dir):
                logger.info(f"Removed {tmp}, left by an interrupted run.")
            setup = {}
        except (OutputDirLockedError, GenerationInputError) as err:
            lock.release()
            setup = {"error": err}
    setup = broadcast_object_list([setup])[0]
    if "error" in setup:
        raise setup["error"]
    plan = plan_shards(len(adapters.class_names), config.images_per_class, config.shard_size)
    try:
        unfinished = _gather_unfinished(output_dir, split_work(plan, state.num_processes, state.process_index),
                                        run_info, state)  # fmt: skip
        pending = [s for s in plan if s in unfinished]
        if len(pending) < len(plan):
            logger.info(f"Resuming: {len(plan) - len(pending)} finished shard(s) kept.")

        # 3. Generate this process's share.
        mine = split_work(pending, state.num_processes, state.process_index)
        logger.info(
            f"Process {state.process_index + 1}/{state.num_processes}: {len(mine)} shard(s), "
            f"{sum(s.num_images for s in mine)} images to generate."
        )
        generate_shards(
            sampler,
            output_dir,
            mine,
            run_info["fingerprint"],
            show_progress=state.is_local_main_process,
            on_shard_written=on_shard_written,
        )
        sampler.reset()

        # 4. Every process checks its own shards (the last collective: it waits for the slowest process); then the
        #    main process writes the run manifest, a sample grid and the dataset card, the others gone.
        missing = _gather_unfinished(output_dir, mine, run_info, state)
        still_missing = [s for s in pending if s in missing]
        if still_missing:
            raise RuntimeError(f"{len(still_missing)} shard(s) missing after generation, e.g. {still_missing[0]}.")
        if state.is_main_process:
            write_sample_grid(output_dir)
            manifest = {
                "fingerprint": run_info["fingerprint"],
                "complete": True,
                "num_images": len(adapters.class_names) * config.images_per_class,
                "shards": [
                    {"file": s.relative_path(adapters.class_names), "class_index": s.class_index, "start": s.start}
                    for s in plan
                ],
            }
            write_json_atomic(output_dir / GENERATION_MANIFEST_NAME, manifest)
            # The card last: its YAML makes the folder loadable with `datasets.load_dataset(output_dir)`.
            write_dataset_card(output_dir, license=args.dataset_license, repo_id=args.hub_dataset_id)
    finally:
        lock.release()
    return run_info
