"""How the three training scripts read their settings: `HfArgumentParser` over the stage's dataclasses, from flags or
from one JSON/YAML config file, with the flag spellings the scripts have always accepted."""

from __future__ import annotations

import json
import sys
from argparse import SUPPRESS
from collections.abc import Iterable
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from .errors import DEBUG_HELP, InputError
from .presets import preset_flag_defaults, recipe_flag_defaults

CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


class ScriptArgumentParser(HfArgumentParser):
    """`HfArgumentParser` with what the scripts add to it.

    Args:
        dataclass_types: the stage's dataclasses; every field is a flag (`--name`), its help from the field's metadata
            and its checks in the dataclass's `__post_init__`.
        defaults: the script's defaults where they differ from the dataclasses' (e.g. stage 3's evaluation every
            epoch); they apply to a config file too.
        comma_separated: `list[str]` fields that also take one comma-separated value, `--class_names a,b,c` (the
            scripts' spelling), beside `--class_names a b c`.
        negatable: boolean fields (default True, or None) that also take `--no-<name>` (argparse's
            `BooleanOptionalAction` spelling, e.g. `--no-cache_latents`), beside `--no_<name>` and `--<name> false`.

    `parse()` reads the command line, or a config file when it is the only argument: `script.py config.yaml` (JSON or
    YAML, one key per field), as transformers' and trl's example scripts do. A `--dataset_preset` (see
    `datadream_hf.presets`) sets the defaults of the flags it knows (columns, splits, K, stage-3 epochs) over the
    script's, and a stage-3 `--recipe` (e.g. `loft`) its own over both; a flag given explicitly still wins. A
    `bool | None` flag (e.g. stage 3's `--fp16`, None = decided at run time) takes `--flag` alone for True, like a
    plain bool flag.
    """

    def __init__(
        self,
        dataclass_types,
        defaults: dict | None = None,
        comma_separated: Iterable[str] = (),
        negatable: Iterable[str] = (),
        **kwargs,
    ):
        kwargs.setdefault("epilog", DEBUG_HELP)
        super().__init__(dataclass_types, **kwargs)
        self.script_defaults = dict(defaults or {})
        self.set_defaults(**self.script_defaults)
        self.comma_separated = tuple(comma_separated)
        for name in negatable:
            self.add_argument(f"--no-{name}", action="store_false", dest=name, help=SUPPRESS)
            if f"--no_{name}" not in self._option_string_actions:  # a `bool | None` field gets no `--no_` of its own
                self.add_argument(f"--no_{name}", action="store_false", dest=name, help=SUPPRESS)
        for action in self._actions:
            if action.type is string_to_bool and action.nargs is None:
                action.nargs, action.const = "?", True

    def _preset_defaults(self, preset: str | None, recipe: str | None = None) -> dict:
        """The defaults preset `preset`, then recipe `recipe` (which wins), set for this script's flags."""
        dests = {action.dest for action in self._actions}
        defaults = {**preset_flag_defaults(preset), **recipe_flag_defaults(recipe)}
        return {name: value for name, value in defaults.items() if name in dests}

    def parse(self, args: list[str] | None = None) -> tuple:
        """The dataclass instances, in the order of `dataclass_types`, from `args` (default: `sys.argv[1:]`)."""
        args = sys.argv[1:] if args is None else [str(arg) for arg in args]
        if len(args) == 1 and args[0].endswith(CONFIG_FILE_SUFFIXES):
            return self.parse_config_file(args[0])
        known = self.parse_known_args(args)[0]
        preset, recipe = getattr(known, "dataset_preset", None), getattr(known, "recipe", None)
        self.set_defaults(**self._preset_defaults(preset, recipe))
        return self.parse_args_into_dataclasses(args=args, look_for_args_file=False)

    def parse_config_file(self, path: str) -> tuple:
        """The dataclass instances from a JSON or YAML file; an unknown key is an error, not ignored."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
            raise InputError(f"Config file {path!r} cannot be read: {' '.join(str(err).split())}.") from None
        if not isinstance(values, dict):
            raise ValueError(f"Config file {path!r} must hold a mapping of flag names to values, got {type(values)}.")
        presets = self._preset_defaults(values.get("dataset_preset"), values.get("recipe"))
        values = {**self.script_defaults, **presets, **values}
        for name in self.comma_separated:
            if isinstance(values.get(name), str):
                values[name] = split_commas([values[name]])
        return self.parse_dict(values)

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        for name in self.comma_separated:
            if isinstance(getattr(namespace, name, None), list):
                setattr(namespace, name, split_commas(getattr(namespace, name)))
        return namespace, remaining


def split_commas(values: list[str]) -> list[str] | None:
    """`["a,b", "c"]` -> `["a", "b", "c"]` (stripped); None when nothing is given (`--class_names ""`)."""
    names = [name.strip() for value in values for name in value.split(",")]
    return names if any(names) else None
