"""`datadream-hf` command line: draw the K-shot manifest, list the dataset presets, write the random-weight test models
and the bundled digits, show the tiny world's models and recipe.

An input error prints one line (`--debug` or `DATADREAM_DEBUG=1`: the traceback).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .console import setup_script_console
from .errors import DEBUG_HELP, run_script
from .files import check_output_path
from .validation import K_SHOTS, SEED, check_ranges

# What each command's numeric options may be (`datadream_hf.validation`), checked before any work.
NUMERIC_RANGES = {"few-shot": {"k": K_SHOTS.or_none(), "seed": SEED}, "tiny-world": {"k": K_SHOTS}}


def _few_shot(args: argparse.Namespace) -> None:
    from .class_names import display_class_names, rename_classes
    from .data import class_names_of, load_labelled_dataset
    from .few_shot import draw_few_shot
    from .presets import preset_flag_defaults
    from .prompts import domain_for_preset

    if args.dataset_preset:
        domain_for_preset(args.dataset_preset)  # an unknown preset fails here, naming the known ones
    check_output_path(args.output, "--output", folder=False)
    setup_script_console(libraries=("datasets",))  # a piped output gets lines, not progress-bar redraws
    # The preset's columns, split and K, unless given.
    settings = {"split": "train", "image_column": "image", "label_column": "label", "k": 16}
    settings.update({k: v for k, v in preset_flag_defaults(args.dataset_preset).items() if k in settings})
    settings.update({k: getattr(args, k) for k in settings if getattr(args, k) is not None})
    class_names = args.class_names.split(",") if args.class_names else None
    dataset = load_labelled_dataset(
        args.dataset,
        split=settings["split"],
        image_column=settings["image_column"],
        label_column=settings["label_column"],
        class_names=class_names,
    )
    source_names = class_names_of(dataset)
    dataset = rename_classes(dataset, display_class_names(source_names, args.dataset_preset, args.class_names_file))
    manifest = draw_few_shot(
        dataset,
        k=settings["k"],
        seed=args.seed,
        source_name=str(args.dataset),
        split=settings["split"],
        source_class_names=source_names,
    )
    manifest.select(dataset)  # decode the chosen images now: a corrupt file fails here, not in stage 1
    Path(args.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
    manifest.save(Path(args.output).expanduser())
    summary = {"manifest": args.output, "k": manifest.k, "seed": args.seed, "classes": len(manifest.class_names)}
    summary["names"] = dict(list(zip(source_names, manifest.class_names))[:3])  # e.g. {"n01440764": "tench"}
    print(json.dumps(summary))


def _presets(args: argparse.Namespace) -> None:
    from .presets import PRESETS

    rows = [("preset", "domain", "classes", "K", "stage-3 epochs", "Hub copy", "image / label", "train / test split")]
    for preset in PRESETS.values():
        names = preset.class_names
        rows.append((
            preset.name,
            repr(preset.domain),
            str(len(names)) if names else "-",
            str(preset.k),
            str(preset.classifier_epochs or "-"),
            preset.hub_dataset or "-",
            f"{preset.image_column} / {preset.label_column}",
            f"{preset.train_split} / {preset.test_split}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _tiny_models(args: argparse.Namespace) -> None:
    from .testing import save_tiny_clip, save_tiny_stable_diffusion

    check_output_path(args.output_dir, "--output_dir")
    setup_script_console(libraries=("diffusers", "huggingface_hub", "transformers"))
    print(save_tiny_stable_diffusion(f"{args.output_dir}/tiny-sd"))
    print(save_tiny_clip(f"{args.output_dir}/tiny-clip"))


def _tiny_world(args: argparse.Namespace) -> None:
    from .tiny_world.recipe import TinyWorldRecipe
    from .tiny_world.world import tiny_world_paths

    paths = tiny_world_paths()
    print(json.dumps({"generator": str(paths.generator), "clip": str(paths.clip)}))
    if args.recipe:
        recipe = TinyWorldRecipe(k=args.k)
        print(
            "# DataDream on your images with the tiny world's models and the demo's settings, one process each "
            "(`accelerate launch --num_processes N` in place of `python` splits stages 1 and 2 over N processes):"
        )
        print("\n".join(recipe.commands(str(paths.generator), str(paths.clip), args.dataset, args.class_names)))


def _digits(args: argparse.Namespace) -> None:
    from .tiny_world.digits import load_digits_dataset

    check_output_path(args.output_dir, "--output_dir")
    setup_script_console(libraries=("datasets",))
    load_digits_dataset().save_to_disk(args.output_dir)
    print(args.output_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datadream-hf", description=__doc__, epilog=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    few_shot = commands.add_parser("few-shot", help="Draw the seeded K-shot subset every stage reads.")
    few_shot.add_argument("--dataset", required=True, help="Hub id, save_to_disk folder or image folder.")
    few_shot.add_argument(
        "--dataset_preset",
        default=None,
        help="One of the paper's datasets (`datadream-hf presets`): its curated class names, columns, split and K.",
    )
    few_shot.add_argument("--split", default=None, help="Split to draw from (default: the preset's, else train).")
    few_shot.add_argument("--image_column", default=None, help="Default: the preset's, else image.")
    few_shot.add_argument("--label_column", default=None, help="Default: the preset's, else label.")
    few_shot.add_argument("--class_names", default=None, help="Comma-separated classes to keep, in this order.")
    few_shot.add_argument(
        "--class_names_file",
        default=None,
        help="Rename the classes: a JSON list (one name per class, in label order) or a mapping (dataset name -> "
        "new name); the manifest records both names and every stage uses the new ones in its prompts.",
    )
    few_shot.add_argument("--k", type=int, default=None, help="Real images per class (default: the preset's, 16).")
    few_shot.add_argument("--seed", type=int, default=0)
    few_shot.add_argument("--output", required=True, help="Path of the manifest JSON to write.")
    few_shot.set_defaults(func=_few_shot)

    presets = commands.add_parser("presets", help="List the dataset presets (the paper's ten datasets).")
    presets.set_defaults(func=_presets)

    tiny_help = (
        "Write tiny SD and CLIP models with RANDOM weights, for plumbing tests only (they learn nothing useful). "
        "For meaningful offline runs use the tiny world's pre-trained models (`datadream-hf tiny-world`)."
    )
    tiny = commands.add_parser("tiny-models", help=tiny_help, description=tiny_help)
    tiny.add_argument("--output_dir", required=True)
    tiny.set_defaults(func=_tiny_models)

    world_help = (
        "Print the folders of the tiny world's pre-trained generator and CLIP (offline, shipped in the package); "
        "with --recipe, the commands that run DataDream on your own images with them and the demo's settings."
    )
    world = commands.add_parser("tiny-world", help=world_help, description=world_help)
    world.add_argument("--recipe", action="store_true", help="Also print the stage commands of the demo's recipe.")
    world.add_argument(
        "--dataset",
        default="my_digits",
        help="The dataset the printed commands read: a save_to_disk folder with train and test splits, an image "
        "folder with train/ and test/ split folders of class folders, or a folder of class folders (stage 3 then "
        "carves its test images too); the K shots and stage 3's validation images come from train. 32 px images: the "
        "tiny world knows digit-like images only.",
    )
    world.add_argument("--class_names", default=None, help="Comma-separated classes to keep, in this order.")
    world.add_argument("--k", type=int, default=16, help="Real images per class of the printed recipe.")
    world.set_defaults(func=_tiny_world)

    digits = commands.add_parser("digits", help="Write scikit-learn's digits as a datasets folder (save_to_disk).")
    digits.add_argument("--output_dir", required=True)
    digits.set_defaults(func=_digits)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Runs a `datadream-hf` command; errors propagate (the console entry point is `console_main`)."""
    _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> None:
    check_ranges(args, NUMERIC_RANGES.get(args.command, {}))
    args.func(args)


def console_main() -> None:
    """The `datadream-hf` command: `main` with an input error as one line (`--debug`: the traceback)."""
    run_script(_run, build_parser().parse_args, script="datadream-hf")


if __name__ == "__main__":
    console_main()
