"""`datadream-hf` command line: draw the K-shot manifest, write the random-weight test models and the bundled digits.

An input error prints one line (`--debug` or `DATADREAM_DEBUG=1`: the traceback).
"""

from __future__ import annotations

import argparse
import json

from .errors import DEBUG_HELP, run_script


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
    parser = argparse.ArgumentParser(prog="datadream-hf", description=__doc__, epilog=DEBUG_HELP)
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

    tiny_help = (
        "Write tiny SD and CLIP models with RANDOM weights, for plumbing tests only (they learn nothing useful). "
        "For meaningful offline runs use the tiny world's pre-trained models (`datadream-hf tiny-world`)."
    )
    tiny = commands.add_parser("tiny-models", help=tiny_help, description=tiny_help)
    tiny.add_argument("--output_dir", required=True)
    tiny.set_defaults(func=_tiny_models)

    digits = commands.add_parser("digits", help="Write scikit-learn's digits as a datasets folder (save_to_disk).")
    digits.add_argument("--output_dir", required=True)
    digits.set_defaults(func=_digits)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Runs a `datadream-hf` command; errors propagate (the console entry point is `console_main`)."""
    _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> None:
    args.func(args)


def console_main() -> None:
    """The `datadream-hf` command: `main` with an input error as one line (`--debug`: the traceback)."""
    run_script(_run, build_parser().parse_args, script="datadream-hf")


if __name__ == "__main__":
    console_main()
