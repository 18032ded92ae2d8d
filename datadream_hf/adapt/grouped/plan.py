"""Which classes grouped cls training trains together: the run's deterministic groups, and how a resumed run continues
them from the checkpoints it finds, whichever strategy or group size wrote those.

A process's classes (i % P == rank, in class order) are cut into consecutive groups of `size` among classes of equal
step counts, so the groups depend only on the class list, the process count and the size. On resume, a group whose
classes were trained together continues from the newest checkpoint step they all hold, with any of them that already
finished (retrained, not rewritten): the same computation as the uninterrupted run, bit for bit. Classes that come
from other groups (a sequential run, another group size, a group halved after running out of memory) continue with
the classes whose newest checkpoint has the same step and the same group, so no class loses a step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ...lora import LORA_WEIGHT_NAME
from ...run_folder import checkpoint_step
from ..checkpoints import checkpoint_trained_with, list_checkpoints
from ..config import GeneratorTrainingConfig
from ..data import TrainingUnit, total_steps, unit_steps
from ..outputs import training_log_trained_with

logger = logging.getLogger(__name__)


def consecutive_groups(items: list, steps: list[int], size: int | None) -> list[list]:
    """`items` cut into consecutive groups of at most `size` (None: no limit) among items of equal `steps` (a group
    shares one lr schedule; K-shot data gives every class the same steps)."""
    by_steps: dict[int, list] = {}
    for item, count in zip(items, steps):
        by_steps.setdefault(count, []).append(item)
    groups = []
    for same in by_steps.values():
        step = size or len(same)
        groups += [same[i : i + step] for i in range(0, len(same), step)]
    return groups


def group_units(
    units: list[TrainingUnit], config: GeneratorTrainingConfig, size: int | None
) -> list[list[TrainingUnit]]:
    """This process's groups of at most `size` classes (None: all of them)."""
    return consecutive_groups(units, [unit_steps(unit, config) for unit in units], size)


def run_groups(
    class_counts: list[int], config: GeneratorTrainingConfig, num_processes: int, size: int | None
) -> list[list[int]]:
    """The class indices of every group of a run, process by process; `class_counts[i]`: class i's images."""
    groups = []
    for rank in range(num_processes):
        mine = [i for i in range(len(class_counts)) if i % num_processes == rank]
        steps = [total_steps(class_counts[i], config.train_batch_size, config.num_train_epochs,
                             config.max_train_steps) for i in mine]  # fmt: skip
        groups += consecutive_groups(mine, steps, size)
    return groups


@dataclass
class GroupStart:
    """Classes to train together from `step` (0: their inits; else each class's `checkpoint-<step>`)."""

    units: list[TrainingUnit]
    step: int


def resume_plan(group: list[TrainingUnit], output_dir: Path) -> list[GroupStart]:
    """How the classes of `group` continue from what `output_dir` holds (see the module docstring); [] if done."""
    names = tuple(unit.folder for unit in group)
    finished = {unit.folder: (output_dir / unit.folder / LORA_WEIGHT_NAME).is_file() for unit in group}
    unfinished = [unit for unit in group if not finished[unit.folder]]
    if not unfinished:
        return []
    # Each class's checkpoints: step -> the group that made it.
    made_by = {
        unit.folder: {
            checkpoint_step(c): checkpoint_trained_with(c) for c in list_checkpoints(output_dir / unit.folder)
        }
        for unit in group
    }
    # 1. Trained in this very group: continue it whole from the newest step all its classes hold, finished ones
    #    (killed while the group exported) included. Newer checkpoints of this group (a kill between the classes'
    #    writes) are recomputed identically.
    members = [u for u in group if not finished[u.folder] or training_log_trained_with(output_dir / u.folder) == names]
    common = set.intersection(*(set(made_by[u.folder]) for u in members))
    step = max(common, default=0)
    elsewhere = [u for u in unfinished if any(s > step and by != names for s, by in made_by[u.folder].items())]
    if not elsewhere:
        return [GroupStart(members, step)]
    # 2. Progress made in other groups: continue with the classes at the same step of the same group.
    parts: dict[tuple, list[TrainingUnit]] = {}
    for unit in unfinished:
        newest = max(made_by[unit.folder], default=0)
        parts.setdefault((newest, made_by[unit.folder].get(newest)), []).append(unit)
    plan = [GroupStart(units, newest) for (newest, _), units in parts.items()]
    logger.info(
        "Classes %s were trained in other groups (another strategy or group size): they continue as %s.",
        [u.name for u in unfinished], [([u.name for u in start.units], start.step) for start in plan],
    )  # fmt: skip
    return plan
