"""The input checks every stage's config and the `datadream-hf` command share: declared ranges of numeric settings,
checked (finite, of the right type, inside the range) before any work, and the error a run raises when its loss,
weights or images stop being finite.

Each config dataclass declares `NUMERIC_RANGES` (field name -> `Range`) and calls `check_ranges` in `__post_init__`;
`tests/test_reliability.py` fails when a numeric field has no declared range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InputError

SEED_MAX = 2**32 - 1  # numpy's global seeding (transformers' `set_seed`) takes seeds below 2**32


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: finite; an integer when `integer`; inside [low, high] (an end excluded
    when `low_open` / `high_open`); a multiple of `multiple_of`; or None when `optional`. `hint` ends the error."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    multiple_of: int | None = None
    optional: bool = False
    hint: str = ""

    def or_none(self) -> Range:
        return dataclasses.replace(self, optional=True)

    def with_hint(self, hint: str) -> Range:
        return dataclasses.replace(self, hint=hint)

    def describe(self) -> str:
        """E.g. `an integer >= 1`, `a finite number in [0, 1)`, `an integer in [8, 4096], a multiple of 8, or None`."""
        kind = "an integer" if self.integer else "a finite number"
        low, high = _number(self.low), _number(self.high)
        if math.isinf(self.low) and math.isinf(self.high):
            text = kind
        elif math.isinf(self.high):
            text = f"{kind} {'>' if self.low_open else '>='} {low}"
        elif math.isinf(self.low):
            text = f"{kind} {'<' if self.high_open else '<='} {high}"
        else:
            text = f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        return text + (", or None" if self.optional else "")

    def allows(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):  # (a huge int has no float)
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below and (not self.multiple_of or value % self.multiple_of == 0)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def integer(low: float = -math.inf, high: float = math.inf, **kwargs) -> Range:
    return Range(low, high, integer=True, **kwargs)


def number(low: float = -math.inf, high: float = math.inf, **kwargs) -> Range:
    return Range(low, high, **kwargs)


# The ranges most settings use.
COUNT = integer(1)  # steps, sizes, images: at least one
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(0, low_open=True)  # norms, scales, epochs
NON_NEGATIVE = number(0)  # warm-up, guidance
RATE = number(0, 1, low_open=True)  # (0, 1]: learning rates and Adam's epsilon (above 1, float32 AdamW overflows)
PROBABILITY = number(0, 1)  # [0, 1]: loss weights, probabilities, and weight decay (AdamW scales by 1 - lr * wd)
BETA = number(0, 1, high_open=True)  # [0, 1): Adam betas, dropout
SEED = integer(0, SEED_MAX)
K_SHOTS = COUNT.with_hint("K, the real images per class; the paper uses 16")


def range_error(name: str, value, allowed: Range) -> str:
    """The message of a refused value: the flag, the value and the allowed range (and a YAML hint for text)."""
    message = f"`--{name}` = {value!r} is invalid: use {allowed.describe()}"
    message += f" ({allowed.hint})." if allowed.hint else "."
    if isinstance(value, str):
        message += " It is text, not a number (YAML reads e.g. 1e-4 as text: write 1.0e-4)."
    return message


def check_value(name: str, value, allowed: Range, error: type[Exception] = InputError) -> None:
    """Raises `error` naming `--name`, `value` and the range unless `allowed` holds `value`."""
    if not allowed.allows(value):
        raise error(range_error(name, value, allowed))


def check_ranges(settings, ranges: Mapping[str, Range], error: type[Exception] = InputError) -> None:
    """`check_value` on every attribute of `settings` that `ranges` names, in order."""
    for name, allowed in ranges.items():
        check_value(name, getattr(settings, name), allowed, error)


# --- the second line of defence: numbers that stop being finite during a run -------------------------------------


class NonFiniteError(InputError):
    """A training loss, trained weights or generated images that are NaN or infinite; nothing is written from them.
    An input error: its causes are settings or weights, which the message names."""


NON_FINITE_CAUSES = (
    "Usual causes: a too high --learning_rate, no gradient clipping (--max_grad_norm), an fp16 overflow "
    "(--mixed_precision), or NaN in the base model's weights"
)


def check_finite_loss(loss: float, what: str, step: int) -> None:
    """Raises `NonFiniteError` if the training loss of `what` (e.g. "adapter 'cat'") at `step` is not finite: the
    step's update would make the weights NaN. (An fp16 loss-scaler overflow shows in the gradients, not in the loss,
    and the scaler skips that step instead.)"""
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"Training of {what} diverged: the loss is {loss} at step {step}. Stopped before anything was written "
            f"from it (earlier checkpoints are kept). {NON_FINITE_CAUSES}; fix it and start again in an empty "
            "--output_dir."
        )


def check_finite_weights(tensors: Mapping, what: str) -> None:
    """Raises `NonFiniteError` naming `what` and the first offending tensor if any of `tensors` (name -> tensor)
    holds NaN or inf; called before an adapter or a checkpoint is written."""
    bad = [name for name, tensor in tensors.items() if not bool(tensor.isfinite().all())]
    if bad:
        raise NonFiniteError(
            f"Refusing to write {what}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]!r}), training "
            f"diverged. {NON_FINITE_CAUSES}; fix it and start again in an empty --output_dir."
        )
