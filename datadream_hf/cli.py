"""`datadream-hf` command line: draw the K-shot manifest, write the offline tiny models and the bundled digits."""

from __future__ import annotations

import argparse
import json

from .validation import K_SHOTS, SEED, check_ranges

# What each command's numeric options may be (`datadream_hf.validation`), checked before any work.
NUMERIC_RANGES = {"few-shot": {"k": K_SHOTS, "seed": SEED}}


def _few_shot(args: argparse.Namespace) -> None:
    from .data import load_labelled_dataset
    from .few_shot import draw_few_shot

    class_names = args.class_names.split(",") if args.class_names else None
    dataset = load_labelled_dataset(
        args.dataset,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        class_names=class_names,
    )
    manifest = draw_few_shot(dataset, k=args.k, seed=args.seed, source_name=str(args.dataset), split=args.split)
    manifest.select(dataset)  # decode the chosen images now: a corrupt file fails here, not in stage 1
    manifest.save(args.output)
    print(json.dumps({"manifest": args.output, "k": args.k, "seed": args.seed, "classes": len(manifest.class_names)}))


def _tiny_models(args: argparse.Namespace) -> None:
    from .testing import save_tiny_clip, save_tiny_stable_diffusion

    print(save_tiny_stable_diffusion(f"{args.output_dir}/tiny-sd"))
    print(save_tiny_clip(f"{args.output_dir}/tiny-clip"))


def _digits(args: argparse.Namespace) -> None:
    from .tiny_world.digits import load_digits_dataset

    load_digits_dataset().save_to_disk(args.output_dir)
    print(args.output_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datadream-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    few_shot = commands.add_parser("few-shot", help="Draw the seeded K-shot subset every stage reads.")
    few_shot.add_argument("--dataset", required=True, help="Hub id, save_to_disk folder or image folder.")
    few_shot.add_argument("--split", default="train")
    few_shot.add_argument("--image_column", default="image")
    few_shot.add_argument("--label_column", default="label")
    few_shot.add_argument("--class_names", default=None, help="Comma-separated classes to keep, in this order.")
    few_shot.add_argument("--k", type=int, default=16, help="Real images per class (the paper uses 16).")
    few_shot.add_argument("--seed", type=int, default=0)
    few_shot.add_argument("--output", required=True, help="Path of the manifest JSON to write.")
    few_shot.set_defaults(func=_few_shot)

    tiny = commands.add_parser("tiny-models", help="Write the tiny offline SD and CLIP models (for tests and demos).")
    tiny.add_argument("--output_dir", required=True)
    tiny.set_defaults(func=_tiny_models)

    digits = commands.add_parser("digits", help="Write scikit-learn's digits as a datasets folder (save_to_disk).")
    digits.add_argument("--output_dir", required=True)
    digits.set_defaults(func=_digits)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_ranges(args, NUMERIC_RANGES.get(args.command, {}))
    except ValueError as err:
        parser.error(str(err))  # as argparse reports a bad flag value: usage, the message, exit status 2
    args.func(args)


if __name__ == "__main__":
    main()
