"""Pre-trains the tiny world: a 32 px latent diffusion model and a tiny CLIP backbone, on the bundled digits (minus
the K=16 few-shot subset), with captions computed from the pixels and without class labels, deterministically on CPU.
The result ships in `datadream_hf/assets/tiny_world/`; this script is how it was made (see that folder's README.md).

Rebuild the shipped weights (one process, one thread: 18 minutes on this repository's 2-core CPU):

    OMP_NUM_THREADS=1 python training_scripts/pretrain_tiny_world.py --output_dir datadream_hf/assets/tiny_world

Then measure them (class-fidelity probe, LoRA nudge, CLIP linear probe) and add the numbers to the card:

    OMP_NUM_THREADS=1 python training_scripts/check_tiny_world.py --update_card

It is a single-process CPU job on purpose (no `accelerate launch`): bit-exact reproducibility matters more here than
speed, and the whole run fits in minutes. Every `TinyWorldConfig` field is a flag (e.g. `--unet_steps 3000`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from datadream_hf.tiny_world.world import TinyWorldConfig, pretrain_tiny_world


@dataclass
class ScriptArguments:
    output_dir: str = field(metadata={"help": "Folder to write generator/, clip/, tiny_world.json and README.md to."})


def parse_args(input_args: list[str] | None = None) -> tuple[ScriptArguments, TinyWorldConfig]:
    parser = HfArgumentParser((ScriptArguments, TinyWorldConfig), description=__doc__.split("\n\n")[0])
    return parser.parse_args_into_dataclasses(args=input_args)


def main(script_args: ScriptArguments, config: TinyWorldConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    metadata = pretrain_tiny_world(script_args.output_dir, config)
    print(json.dumps({"output_dir": script_args.output_dir, **metadata["timings_s"], **metadata["final_losses"]}))
    return metadata


if __name__ == "__main__":
    main(*parse_args())
