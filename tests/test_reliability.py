"""Reliability and security across the three stages: SIGKILL at named points + resume, one table of bad inputs, safe
weight loading, no Hub token in any output, class names that cannot escape, and one run per output folder.

Kills are deterministic: the real scripts run as subprocesses with `DATADREAM_TEST_KILL_AT=<point>:<n>`
(`datadream_hf.faults`), and each kill is followed by a resume that must end where an uninterrupted run ends.
"""

import ast
import importlib.util
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file, save_file

import datadream_hf.faults as faults
from datadream_hf.adapt.checkpoints import STATE_NAME, list_checkpoints
from datadream_hf.adapter_index import ADAPTER_INDEX_NAME, read_adapter_index
from datadream_hf.classify.checkpoints import is_complete_checkpoint, latest_complete_checkpoint
from datadream_hf.cli import main as cli_main
from datadream_hf.data import DatasetInputError, decode_images, load_image_folder, load_labelled_dataset
from datadream_hf.faults import FAIL_AT_ENV, KILL_AT_ENV, KILL_POINTS, STOP_AT_ENV, fault_point, parse_kill_spec
from datadream_hf.few_shot import FewShotManifest, draw_few_shot
from datadream_hf.files import OutputPathError
from datadream_hf.generate.config import GenerationArguments, GenerationConfig, GenerationInputError
from datadream_hf.generate.run import generate_synthetic_dataset
from datadream_hf.hub import HubAccessError
from datadream_hf.lora import LORA_WEIGHT_NAME
from datadream_hf.run_folder import LOCK_NAME, OutputDirLockedError, class_folder_name
from datadream_hf.synthetic import SyntheticDataDreamBuilder, SyntheticDatasetError, missing_shards
from datadream_hf.testing import write_fake_stage1_output

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "stage1": REPO / "training_scripts" / "train_datadream_lora.py",
    "stage2": REPO / "training_scripts" / "generate_synthetic.py",
    "stage3": REPO / "training_scripts" / "train_classifier.py",
}
CLASSES = ["zero", "one"]
SENTINEL = "hf_SENTINELtokenNEVERwrittenANYWHERE42"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Subprocesses run with OMP_NUM_THREADS=1; CPU reductions may round differently with other thread counts, and
    # resumed runs are compared bit for bit with in-process ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(stage: str):
    name = SCRIPTS[stage].stem
    spec = importlib.util.spec_from_file_location(name, SCRIPTS[stage])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve the script's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_main(stage: str, args: list[str]):
    script = load_script(stage)
    return script.main(script.parse_args([str(a) for a in args]))


def run_killed(stage: str, args: list[str], kill_at: str) -> subprocess.CompletedProcess:
    """Runs a stage's script in a fresh process that SIGKILLs itself at `kill_at` (`<point>:<n>`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", KILL_AT_ENV: kill_at}
    command = [sys.executable, str(SCRIPTS[stage]), *[str(a) for a in args]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, f"not killed at {kill_at}: {result.stderr[-3000:]}"
    return result


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob(".*") if p.name.endswith(".tmp"))


def assert_same_tensors(first: Path, second: Path):
    a, b = load_file(str(first)), load_file(str(second))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def stage1_data(digits, digits_path, tmp_path_factory):
    """Two digit classes, K=2: the manifest stage 1 trains on (over `digits_path` with --class_names zero,one)."""
    dataset = load_labelled_dataset(digits, split="train", class_names=CLASSES)
    path = tmp_path_factory.mktemp("stage1-data") / "manifest.json"
    draw_few_shot(dataset, k=2, seed=0, source_name="digits", split="train").save(path)
    return {"dataset": digits_path, "manifest": str(path)}


def stage1_args(tiny_sd_path, stage1_data, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", tiny_sd_path, "--dataset", stage1_data["dataset"], "--class_names",
        ",".join(CLASSES), "--few_shot_manifest", stage1_data["manifest"], "--output_dir", output_dir,
        "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "3", "--lr_warmup_steps", "0",
        "--learning_rate", "1e-3", "--checkpointing_steps", "1", "--mode", "cls", "--report_to", "none", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fake_stage1(tiny_sd_path, tmp_path_factory):
    return write_fake_stage1_output(tmp_path_factory.mktemp("fake-stage1") / "cls", tiny_sd_path, CLASSES, seed=0)


STAGE2_FLAGS = ["--images_per_class", "4", "--num_inference_steps", "2", "--batch_size", "2", "--shard_size", "2"]


def stage3_args(tiny_clip_path, digits_path, digits_manifest_path, output_dir, *extra):
    return [
        "--model_name_or_path", tiny_clip_path, "--real_dataset", digits_path, "--few_shot_manifest",
        digits_manifest_path, "--train_mode", "real", "--output_dir", output_dir, "--per_device_train_batch_size",
        "8", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps",
        "--eval_steps", "2", "--validation_per_class", "2", "--augmentation", "none", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0", "--report_to", "none", *extra,
    ]  # fmt: skip


# --- 1. kill at every named point, resume, compare with an uninterrupted run ----------------------------------------


def test_fault_hook_is_inert_unless_set_and_validates_its_spec(monkeypatch):
    monkeypatch.delenv(KILL_AT_ENV, raising=False)
    fault_point("checkpoint-write")  # no variable: nothing happens
    monkeypatch.setenv(KILL_AT_ENV, "shard-write:2")
    fault_point("checkpoint-write")  # another point: nothing happens
    assert parse_kill_spec("trainer-save:3") == ("trainer-save", 3)
    for bad in ("nowhere:1", "checkpoint-write", "checkpoint-write:0", "checkpoint-write:x"):
        with pytest.raises(ValueError, match=KILL_AT_ENV):
            parse_kill_spec(bad)
    monkeypatch.setenv(FAIL_AT_ENV, "trainer-save:2")
    monkeypatch.setattr(faults, "_hits", faults.Counter())
    fault_point("trainer-save")  # the first hit passes
    with pytest.raises(OSError, match=r"No space left on device \(injected by DATADREAM_TEST_FAIL_AT"):
        fault_point("trainer-save")


@dataclass
class KillRun:
    """A small run of one stage: its script, its flags for an output folder, how to resume it, what must hold on
    disk right after a kill, and how its finished output compares with the uninterrupted run's."""

    stage: str
    args: object  # (ctx, out) -> flags
    resume: tuple  # flags added to resume
    after_kill: object  # (out, point) -> None
    compare: object  # (reference, out) -> None


def _stage1_after_kill(out: Path, point: str):
    """Whatever the kill interrupted, the folder does not look finished: no index (stage 2 refuses it), only complete
    checkpoints are listed, and a half-written checkpoint or adapter exists only as a hidden temp folder."""
    with pytest.raises(FileNotFoundError, match=ADAPTER_INDEX_NAME):
        read_adapter_index(out)
    for folder in [out, *[p for p in out.iterdir() if p.is_dir()]]:
        for checkpoint in list_checkpoints(folder):
            json.loads((checkpoint / STATE_NAME).read_text())
    if point in ("checkpoint-write", "adapter-write"):
        assert temp_files(out)


def _stage1_compare(reference: Path, out: Path):
    files = sorted(p.relative_to(reference) for p in reference.rglob(LORA_WEIGHT_NAME))
    assert files and files == sorted(p.relative_to(out) for p in out.rglob(LORA_WEIGHT_NAME))
    for file in files:
        assert_same_tensors(reference / file, out / file)
    assert read_adapter_index(out) == read_adapter_index(reference)
    assert not temp_files(out)


def _stage2_after_kill(out: Path, point: str):
    """An interrupted generation folder is refused as incomplete; the interrupted shard is a temp file (shard-write)
    or a Parquet file without its manifest (shard-manifest), never counted as finished."""
    assert missing_shards(out) and not (out / "generation_manifest.json").exists()
    with pytest.raises(SyntheticDatasetError, match="incomplete"):
        SyntheticDataDreamBuilder(generation_dir=out, cache_dir=str(out.parent / "cache"))
    if point == "shard-write":
        assert temp_files(out)
    else:
        assert any(not p.with_suffix(".json").exists() for p in (out / "shards").rglob("*.parquet"))


def _stage2_compare(reference: Path, out: Path):
    def shard_bytes(folder):
        root = Path(folder) / "shards"
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert shard_bytes(out) == shard_bytes(reference) and not temp_files(out) and not missing_shards(out)


def _stage3_after_kill(out: Path, point: str):
    """No report and no final adapter; the checkpoint being written (trainer-save) is incomplete and is not what a
    resume takes, though it is what the stock Trainer would take."""
    from transformers.trainer_utils import get_last_checkpoint

    assert not (out / "report.json").exists() and not (out / "adapter_model.safetensors").exists()
    latest = latest_complete_checkpoint(out)
    if point == "trainer-save":
        assert Path(get_last_checkpoint(str(out))).name == "checkpoint-4" and latest.name == "checkpoint-2"
        assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()
        assert not is_complete_checkpoint(out / "checkpoint-4")
    else:
        assert latest.name == "checkpoint-4"


def _stage3_compare(reference: Path, out: Path):
    """The uninterrupted run's weights after the last step, step losses, final adapter and numbers. (The final adapter
    is the best checkpoint's, which may predate the kill; checkpoint-6 holds the weights after step 6.)"""
    last = Path("checkpoint-6") / "adapter_model.safetensors"
    assert_same_tensors(reference / last, out / last)

    def step_losses(folder):
        history = json.loads((folder / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
        return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]

    assert step_losses(out) == step_losses(reference) and len(step_losses(reference)) == 6
    assert_same_tensors(reference / "adapter_model.safetensors", out / "adapter_model.safetensors")
    report, expected = (json.loads((folder / "report.json").read_text()) for folder in (out, reference))
    assert report["evaluations"] == expected["evaluations"]
    assert report["selection"]["best_metric"] == expected["selection"]["best_metric"]
    assert Path(report["selection"]["best_checkpoint"]).name == Path(expected["selection"]["best_checkpoint"]).name


# MixUp/CutMix and the reference augmentation on: a resumed run must replay each draw's augmentation seed.
AUGMENTED = ["--augmentation", "datadream", "--mix_augmentation", "mixup_or_cutmix", "--mix_probability", "0.5"]
RESUME = ("--resume_from_checkpoint", "latest")
KILL_RUNS = {
    # stage 1: 2 classes, K=2, 3 steps, a checkpoint after every step; dset (the sequential loop, one adapter) and
    # cls grouped (both classes step together, each with its own checkpoints and adapter)
    "stage1-dset": KillRun("stage1", lambda c, out: stage1_args(c.tiny_sd, c.stage1_data, out, "--mode", "dset"),
                           RESUME, _stage1_after_kill, _stage1_compare),
    "stage1-cls-grouped": KillRun(
        "stage1", lambda c, out: stage1_args(c.tiny_sd, c.stage1_data, out, "--cls_strategy", "grouped"), RESUME,
        _stage1_after_kill, _stage1_compare),
    # stage 2: 2 classes x 4 images in shards of 2; a re-run with the same flags resumes
    "stage2": KillRun("stage2", lambda c, out: ["--pretrained_model_name_or_path", c.tiny_sd, "--adapter_path",
                                                c.fake_stage1, "--output_dir", out, *STAGE2_FLAGS],
                      (), _stage2_after_kill, _stage2_compare),
    # stage 3: 6 Trainer steps, a checkpoint (and evaluation) every 2
    "stage3": KillRun("stage3", lambda c, out: stage3_args(c.tiny_clip, c.digits_path, c.digits_manifest, out,
                                                           *AUGMENTED), RESUME, _stage3_after_kill, _stage3_compare),
}  # fmt: skip
# Every named point, in every run that reaches it, and which hit of it the kill takes.
KILLS = {
    "generator-step": {"stage1-dset": 2, "stage1-cls-grouped": 2},  # inside step 2
    "checkpoint-write": {"stage1-dset": 2, "stage1-cls-grouped": 3},  # dset: checkpoint-2; cls: zero's checkpoint-2
    "adapter-write": {"stage1-dset": 1, "stage1-cls-grouped": 2},  # cls: zero's adapter in place, one's in its temp
    "shard-write": {"stage2": 2},
    "shard-manifest": {"stage2": 2},
    "trainer-step": {"stage3": 5},  # inside step 5: checkpoints 2 and 4 complete
    "trainer-save": {"stage3": 2},  # checkpoint-4: its adapter written, its optimizer and state not
}
KILL_CASES = [(point, run, hit) for point in KILL_POINTS for run, hit in KILLS[point].items()]


def test_the_kill_loop_covers_every_named_point():
    assert list(KILLS) == list(KILL_POINTS)


@pytest.fixture(scope="module")
def kill_ctx(tmp_path_factory, tiny_sd_path, tiny_clip_path, digits_path, digits_manifest_path, stage1_data,
             fake_stage1):  # fmt: skip
    return Ctx(tmp_path_factory.mktemp("kills"), None, tiny_sd_path, tiny_clip_path, digits_path, digits_manifest_path,
               stage1_data, fake_stage1)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(kill_ctx):
    """Each run's uninterrupted output, made in this process on first use."""
    outputs = {}

    def output(name: str) -> Path:
        if name not in outputs:
            outputs[name] = kill_ctx.tmp / f"reference-{name}"
            run_main(KILL_RUNS[name].stage, KILL_RUNS[name].args(kill_ctx, outputs[name]))
        return outputs[name]

    return output


@pytest.mark.parametrize("point, run, hit", KILL_CASES, ids=[f"{p}-{r}" for p, r, _ in KILL_CASES])
def test_killed_at_every_named_point_then_resumed_ends_as_the_uninterrupted_run(point, run, hit, kill_ctx,
                                                                                 uninterrupted, tmp_path):  # fmt: skip
    """SIGKILL at the point (a fresh process), check that nothing on disk looks finished, resume with the same command
    (in this process), and compare with the uninterrupted run, bit for bit; no temp file is left."""
    spec = KILL_RUNS[run]
    reference, out = uninterrupted(run), tmp_path / "killed"
    run_killed(spec.stage, spec.args(kill_ctx, out), f"{point}:{hit}")
    spec.after_kill(out, point)
    run_main(spec.stage, [*spec.args(kill_ctx, out), *spec.resume])
    spec.compare(reference, out)


def test_two_stage2_runs_into_one_folder_at_once_one_is_refused_the_other_completes(kill_ctx, uninterrupted,
                                                                                     tmp_path):  # fmt: skip
    """The first run is frozen (SIGSTOP) inside its first shard write, holding the folder; a second run of the same
    command is refused cleanly (exit status 1, the holder's pid named, nothing of it written); the first, continued,
    completes the folder exactly as an uninterrupted run does."""
    out = tmp_path / "shared"
    args = [str(a) for a in KILL_RUNS["stage2"].args(kill_ctx, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPTS["stage2"]), *args]
    log = open(tmp_path / "first.log", "w+")  # not a pipe: a full pipe would block it before its stop point
    first = subprocess.Popen(command, env={**env, STOP_AT_ENV: "shard-write:1"}, stdout=log, stderr=log)
    try:
        wait_until_stopped(first.pid)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"is in use by another run (pid {first.pid})" in second.stderr
        assert temp_files(out) and missing_shards(out)  # the first run's half shard, untouched by the second
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.wait(timeout=300)
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    _stage2_compare(uninterrupted("stage2"), out)


def wait_until_stopped(pid: int, timeout: float = 300) -> None:
    """Waits until process `pid` is stopped (state T in /proc), i.e. it reached its STOP_AT point."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state == "T":
            return
        assert state != "Z", "the process exited before reaching its stop point"
        time.sleep(0.1)
    raise TimeoutError(f"process {pid} did not stop within {timeout} s")


def test_stage3_disk_full_while_checkpointing_leaves_nothing_half_written_and_the_rerun_completes(
    kill_ctx, uninterrupted, tmp_path, monkeypatch
):
    """A write of checkpoint-4 fails with ENOSPC (injected where the Trainer has saved its adapter but not its
    optimizer and state): a clear error, checkpoint-4 removed, checkpoint-2 intact, no final output; re-run with
    --resume_from_checkpoint latest, it ends as the uninterrupted run."""
    out = tmp_path / "full"
    args = KILL_RUNS["stage3"].args(kill_ctx, out)
    monkeypatch.setenv(FAIL_AT_ENV, "trainer-save:2")
    monkeypatch.setattr(faults, "_hits", faults.Counter())
    with pytest.raises(OSError, match=r"Could not write checkpoint '.*checkpoint-4' \(No space left on device.*"
                                      r"it was removed.*--resume_from_checkpoint latest"):  # fmt: skip
        run_main("stage3", args)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert is_complete_checkpoint(out / "checkpoint-2") and not temp_files(out)
    assert not (out / "report.json").exists() and not (out / "adapter_model.safetensors").exists()
    monkeypatch.delenv(FAIL_AT_ENV)
    run_main("stage3", [*args, *RESUME])
    _stage3_compare(uninterrupted("stage3"), out)


# --- 2. bad input: one table, every case named -------------------------------------------------------------------


def noise_image(size=(16, 16), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def png_bytes(image: Image.Image, format="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def sixteen_bit_image() -> Image.Image:
    gradient = np.tile(np.linspace(0, 65535, 16), (16, 1)).astype(np.uint16)  # (16, 16), mean 32767
    return Image.fromarray(gradient)


def bomb_png(side=40000) -> bytes:
    """A valid PNG header that claims `side` x `side` pixels (1.6 gigapixels): a decompression bomb."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_image_folder(root: Path, classes: dict[str, list]) -> Path:
    """`root/<class>/<i>.<ext>` from PIL images, raw bytes, or `(bytes, ext)` pairs."""
    for name, items in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(items):
            data, ext = item if isinstance(item, tuple) else (item, "png")
            (root / name / f"{i}.{ext}").write_bytes(png_bytes(data) if isinstance(data, Image.Image) else data)
    return root


def folder_with(tmp_path: Path, odd, k: int = 2, odd_ext: str = "png") -> tuple[Path, Path]:
    """An image folder (cat: 2 noise images; dog: 1 noise image + `odd`) and a K-shot manifest drawn over it."""
    root = write_image_folder(tmp_path / "images", {"cat": [noise_image(), noise_image(seed=1)],
                                                    "dog": [noise_image(seed=2), (odd, odd_ext)]})  # fmt: skip
    dataset = load_image_folder(root)  # paths only: nothing is decoded yet
    manifest = tmp_path / "manifest.json"
    draw_few_shot(dataset, k=k, seed=0).save(manifest)
    return root, manifest


@dataclass
class Ctx:
    tmp: Path
    out: Path
    tiny_sd: str
    tiny_clip: str
    digits_path: str
    digits_manifest: str
    stage1_data: dict
    fake_stage1: str

    def stage1(self, dataset, manifest, *extra):
        return run_main("stage1", [
            "--pretrained_model_name_or_path", self.tiny_sd, "--dataset", dataset, "--few_shot_manifest", manifest,
            "--output_dir", self.out, "--resolution", "32", "--max_train_steps", "1", "--report_to", "none", *extra,
        ])  # fmt: skip

    def stage1_digits(self, *extra):
        return self.stage1(self.stage1_data["dataset"], self.stage1_data["manifest"], "--class_names", "zero,one",
                           *extra)  # fmt: skip

    def stage2(self, adapters=None, *extra):
        adapters = self.adapters() if adapters is None else adapters
        return run_main("stage2", ["--pretrained_model_name_or_path", self.tiny_sd, "--adapter_path", adapters,
                                   "--output_dir", self.out, *STAGE2_FLAGS, *extra])  # fmt: skip

    def adapters(self, damage=None) -> Path:
        """A copy of the fake stage-1 output, damaged by `damage(folder)`."""
        folder = self.tmp / "adapters"
        if not folder.exists():
            shutil.copytree(self.fake_stage1, folder)
        if damage is not None:
            damage(folder)
        return folder

    def stage3(self, *extra, mode="real"):
        return run_main("stage3", [
            "--model_name_or_path", self.tiny_clip, "--real_dataset", self.digits_path, "--few_shot_manifest",
            self.digits_manifest, "--output_dir", self.out, "--train_mode", mode, "--max_steps", "1",
            "--report_to", "none", *extra,
        ])  # fmt: skip


@pytest.fixture
def ctx(tmp_path, tiny_sd_path, tiny_clip_path, digits_path, digits_manifest_path, stage1_data, fake_stage1):
    return Ctx(tmp_path, tmp_path / "out", tiny_sd_path, tiny_clip_path, digits_path, digits_manifest_path,
               stage1_data, fake_stage1)  # fmt: skip


def saved_dataset(ctx: Ctx, label_feature, labels) -> str:
    images = [noise_image(seed=i) for i in range(len(labels))]
    features = Features({"image": ImageFeature(), "label": label_feature})
    path = ctx.tmp / "dataset"
    Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))
    return str(path)


def odd_image_case(image: Image.Image, ext: str = "png"):
    """An accepted input: the odd image loads as RGB through stage 1's loader and every stage-3 transform."""

    def run(ctx: Ctx):
        from transformers import CLIPProcessor

        from datadream_hf.adapt.config import GeneratorTrainingConfig
        from datadream_hf.adapt.data import load_few_shot_data
        from datadream_hf.classify.augment import build_transforms

        root, manifest = folder_with(ctx.tmp, png_bytes(image, "TIFF" if ext == "tif" else "PNG"), odd_ext=ext)
        config = GeneratorTrainingConfig(pretrained_model_name_or_path=ctx.tiny_sd, dataset=str(root),
                                         few_shot_manifest=str(manifest), output_dir=str(ctx.out))  # fmt: skip
        data = load_few_shot_data(config)
        odd = data.images[-1]
        assert odd.mode == "RGB" and odd.size == image.size
        processor = CLIPProcessor.from_pretrained(ctx.tiny_clip)
        raw = load_image_folder(root)[-1]["image"]  # what stage 3 gets from `datasets`, not converted yet
        for transform in build_transforms(processor.image_processor, "datadream", seed=0):
            pixels = transform(raw)
            assert pixels.shape == (3, 32, 32) and torch.isfinite(pixels).all()
        return odd

    return run


def check_sixteen_bit(odd: Image.Image):
    # PIL's convert("RGB") clips 16-bit values at 255 (a white image); `to_rgb` rescales the gradient instead.
    assert abs(np.asarray(odd, dtype=np.float64).mean() - 127.5) < 2


def hostile_name_case(name: str):
    """An accepted class name: kept verbatim in the labels and prompts, a safe single folder name on disk."""

    def run(ctx: Ctx):
        from datadream_hf.prompts import PromptTemplate

        path = saved_dataset(ctx, Value("string"), [name, name, "plain", "plain"])
        dataset = load_labelled_dataset(path)
        assert name in dataset.features["label"].names
        folder = class_folder_name(dataset.features["label"].names.index(name), name)
        assert (ctx.out / folder).resolve().parent == ctx.out.resolve() and len(folder) <= 53
        assert "/" not in folder and folder not in (".", "..") and folder.isascii()
        assert PromptTemplate()(name) == f"a photo of a {name}"

    return run


def _edit_json(path: Path, **changes):
    payload = json.loads(path.read_text())
    for key, value in changes.items():
        target = payload
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    path.write_text(json.dumps(payload))


def _manifest_of(ctx: Ctx, class_names: list[str]) -> str:
    """A manifest (the class list every stage reads) of `class_names`, one image each."""
    path = ctx.tmp / "classes_manifest.json"
    FewShotManifest(k=1, seed=0, class_names=class_names, indices=[[i] for i in range(len(class_names))]).save(path)
    return str(path)


def _manifest_naming_a_missing_class(folder_and_manifest: tuple[Path, Path]) -> tuple[Path, Path]:
    """The manifest (which carries the class list) names a class `bird` that has no folder."""
    folder, manifest = folder_and_manifest
    payload = json.loads(manifest.read_text())
    bird = [1000 + i for i in range(payload["k"])]  # rows of no other class, so only the folder is missing
    _edit_json(manifest, class_names=[*payload["class_names"], "bird"], indices=[*payload["indices"], bird],
               image_sha256=[*payload["image_sha256"], ["0" * 64] * payload["k"]])  # fmt: skip
    return folder, manifest


def _reshape_lora_weight(folder: Path):
    path = folder / class_folder_name(1, "one") / LORA_WEIGHT_NAME
    weights = load_file(str(path))
    key = next(k for k in sorted(weights) if k.startswith("unet.") and k.endswith("down.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 8)  # as if cross_attention_dim differed
    save_file(weights, str(path))


def _classifier_for_another_base(ctx: Ctx):
    from datadream_hf.classify.modeling import CLIPLoRAClassifier

    folder = ctx.tmp / "classifier"
    CLIPLoRAClassifier.from_clip_pretrained(ctx.tiny_clip, CLASSES).save_pretrained(folder)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(weights)[0]
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 8)  # a wider CLIP's LoRA A
    save_file(weights, str(folder / "adapter_model.safetensors"))
    CLIPLoRAClassifier.from_pretrained(folder)


def _synthetic_with_other_classes(ctx: Ctx):
    path = saved_dataset(ctx, ClassLabel(names=["cat", "dog"]), [0, 1])
    ctx.stage3("--synthetic_dataset", path, mode="real+synthetic")


def _half_written_checkpoint(ctx: Ctx):
    checkpoint = ctx.tmp / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")  # killed before trainer_state.json
    ctx.stage3("--resume_from_checkpoint", checkpoint)


def _stage3_into_a_used_folder(ctx: Ctx):
    used = ctx.tmp / "used"
    (used / "checkpoint-2").mkdir(parents=True)
    (used / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"")
    ctx.stage3("--output_dir", used)


def _edited_manifest(ctx: Ctx, edit, source: str | None = None) -> Path:
    payload = json.loads(Path(source or ctx.stage1_data["manifest"]).read_text())
    edit(payload)
    path = ctx.tmp / "edited.json"
    path.write_text(json.dumps(payload))
    return path


def _stage1_with_broken_link(ctx: Ctx):
    root, manifest = folder_with(ctx.tmp, png_bytes(noise_image(seed=3)))
    (root / "dog" / "2.png").symlink_to(root / "dog" / "deleted.png")
    ctx.stage1(str(root), str(manifest))


def _case_twins(ctx: Ctx) -> tuple[str, str]:
    """An image folder whose classes are `Cat` and `cat`, and its manifest."""
    root = write_image_folder(ctx.tmp / "twins", {"Cat": [noise_image(seed=i) for i in range(3)],
                                                  "cat": [noise_image(seed=3 + i) for i in range(3)]})  # fmt: skip
    draw_few_shot(load_image_folder(root), k=2, seed=0).save(ctx.tmp / "twins.json")
    return str(root), str(ctx.tmp / "twins.json")


def _stage3_case_twins(ctx: Ctx):
    root, manifest = _case_twins(ctx)
    ctx.stage3("--real_dataset", root, "--few_shot_manifest", manifest, "--test_split", "none",
               "--validation_per_class", "1")  # fmt: skip


def _cli_few_shot(ctx: Ctx, k: int):
    from datadream_hf.cli import main

    root, _ = folder_with(ctx.tmp, png_bytes(noise_image(seed=3)))
    main(["few-shot", "--dataset", str(root), "--k", str(k), "--output", str(ctx.out / "manifest.json")])


def _truncate_adapter(folder: Path):
    path = folder / class_folder_name(1, "one") / LORA_WEIGHT_NAME
    path.write_bytes(path.read_bytes()[:100])  # as a disk that filled up, or a copy that was cut short, leaves it


def _a_file(ctx: Ctx) -> Path:
    path = ctx.tmp / "a_file"
    path.write_text("not a folder")
    return path


def _unwritable(ctx: Ctx) -> Path:
    """An output folder that cannot be made: in a read-only folder (root ignores permissions: then under /sys)."""
    if os.geteuid() == 0:
        return Path("/sys/datadream-test-output")
    folder = ctx.tmp / "read-only"
    folder.mkdir(mode=0o555)
    return folder / "out"


def _damaged_classifier(ctx: Ctx):
    from datadream_hf.classify.modeling import CLIPLoRAClassifier

    folder = ctx.tmp / "classifier"
    CLIPLoRAClassifier.from_clip_pretrained(ctx.tiny_clip, CLASSES).save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    CLIPLoRAClassifier.from_pretrained(folder)


def _malformed_config_file(ctx: Ctx):
    path = ctx.tmp / "stage3.yaml"
    path.write_text("model_name_or_path: [models/tiny-clip,\n")
    run_main("stage3", [path])


def _synthetic_of_another_draw(ctx: Ctx):
    """Stage 3 with a stage-2 folder whose adapters learned from another K-shot draw than its manifest."""
    synthetic = ctx.tmp / "synthetic"
    ctx.stage2(None, "--output_dir", synthetic)
    other = [[row + 1 for row in rows] for rows in FewShotManifest.load(ctx.digits_manifest).indices]
    _edit_json(synthetic / "generation_config.json", few_shot={"k": 4, "seed": 1, "indices": other})
    ctx.stage3("--synthetic_dataset", synthetic, mode="real+synthetic")


def _stage2_clean_names(ctx: Ctx) -> list[str]:
    """Stage 2's --clean_class_names alone (no template asked for): stage 1's template, with '_' as ' '."""
    adapters = write_fake_stage1_output(ctx.tmp / "underscored", ctx.tiny_sd, ["big_cat", "small_dog"])
    ctx.stage2(adapters, "--clean_class_names")
    return json.loads((ctx.out / "generation_config.json").read_text())["prompts"]


def _replaced_image(ctx: Ctx):
    """A K-shot image replaced under the same file name after the manifest was drawn."""
    root, manifest = folder_with(ctx.tmp, png_bytes(noise_image(seed=3)))
    (root / "dog" / "1.png").write_bytes(png_bytes(noise_image(seed=4)))
    ctx.stage1(str(root), str(manifest))


def _format_1_manifest(ctx: Ctx):
    """A manifest written before image hashes (format 1) still loads: its images are checked by label only."""
    path = _edited_manifest(ctx, lambda m: m.update(format_version=1) or m.pop("image_sha256"))
    return FewShotManifest.load(path)


def _split_folders_manifest(ctx: Ctx, split: str):
    """Stage 1 on an image folder with train/ and test/ split folders, with a manifest drawn from train."""
    root = ctx.tmp / "splits"
    for name in ("train", "test"):
        write_image_folder(root / name, {"cat": [noise_image(seed=i) for i in range(3)],
                                         "dog": [noise_image(seed=5 + i) for i in range(3)]})  # fmt: skip
    draw_few_shot(load_labelled_dataset(str(root)), k=2, seed=0, split="train").save(ctx.tmp / "splits.json")
    ctx.stage1(str(root), str(ctx.tmp / "splits.json"), "--split", split)


@dataclass
class Case:
    run: object  # (ctx) -> result
    error: type | None = None  # None: the input is accepted
    match: str = ""
    check: object = None  # (result) -> None, for accepted inputs
    loads_model: bool = False  # the check needs the base model (e.g. weight shapes): may run after loading it


CASES = {
    # Images
    "corrupt image": Case(lambda c: c.stage1(*map(str, folder_with(c.tmp, b"definitely not a png"))),
                          DatasetInputError, r"dog/1\.png.*cannot be decoded.*Remove or replace the file"),
    "truncated image": Case(
        lambda c: c.stage1(*map(str, folder_with(c.tmp, png_bytes(noise_image((64, 64)))[:2000]))),
        DatasetInputError, r"dog/1\.png.*cannot be decoded"),
    "huge image (decompression bomb)": Case(lambda c: c.stage1(*map(str, folder_with(c.tmp, bomb_png()))),
                                            DatasetInputError, r"dog/1\.png.*too large.*MAX_IMAGE_PIXELS"),
    "grayscale image": Case(odd_image_case(noise_image(mode="L"))),
    "grayscale + alpha image": Case(odd_image_case(noise_image(mode="LA"))),
    "RGBA image": Case(odd_image_case(noise_image(mode="RGBA"))),
    "palette image": Case(odd_image_case(noise_image(mode="P"))),
    "CMYK TIFF image": Case(odd_image_case(noise_image(mode="CMYK"), ext="tif")),
    "16-bit grayscale image": Case(odd_image_case(sixteen_bit_image()), check=check_sixteen_bit),
    "1-pixel image": Case(odd_image_case(noise_image(size=(1, 1)))),
    "1 x 300 pixel image": Case(odd_image_case(noise_image(size=(1, 300)))),
    # Folders and classes
    "missing class folder": Case(
        lambda c: c.stage1(*map(str, _manifest_naming_a_missing_class(folder_with(c.tmp, b""))), "--class_names",
                           "cat,dog,bird"), DatasetInputError, r"\['bird'\] have no sub-folder"),
    "empty class folder": Case(
        lambda c: c.stage1(str(write_image_folder(c.tmp / "images", {"cat": [noise_image()], "dog": []})),
                           _manifest_of(c, ["cat", "dog"])), DatasetInputError, r"dog'? holds no image file"),
    "K larger than a class has": Case(lambda c: _cli_few_shot(c, k=3), DatasetInputError,
                                      r"Class 'cat' has 2 images but K=3.*lower K"),
    "duplicate class names": Case(
        lambda c: c.stage1(c.stage1_data["dataset"], _manifest_of(c, ["zero", "zero"])), DatasetInputError,
        r"'zero' appears twice.*unique"),
    "unknown class name": Case(lambda c: c.stage1(c.stage1_data["dataset"], _manifest_of(c, ["zero", "eleven"])),
                               DatasetInputError, r"Unknown class name\(s\) \['eleven'\]"),
    "class names that differ from the manifest's": Case(
        lambda c: c.stage1_digits("--class_names", "one,zero"), DatasetInputError,
        r"manifest's classes \['zero', 'one'\].* differ from the dataset's classes given by `class_names`"),
    "class name with /": Case(hostile_name_case("stealth/bomber")),
    "class name ..": Case(hostile_name_case("..")),
    "class name ../../escape": Case(hostile_name_case("../../escape")),
    "class name with spaces": Case(hostile_name_case("boeing 747 400")),
    "unicode class name": Case(hostile_name_case("Cessna Citation ✈ — Ünïcødé 飞机")),
    "very long class name": Case(hostile_name_case("x" * 300)),
    # Columns, manifests, presets
    "label column of the wrong type": Case(
        lambda c: c.stage1(saved_dataset(c, Value("float32"), [0.5, 1.5]), c.stage1_data["manifest"]),
        DatasetInputError, r"Label column 'label' has type.*expected a ClassLabel, integer or string column"),
    "integer labels without class names": Case(
        lambda c: cli_main(["few-shot", "--dataset", saved_dataset(c, Value("int64"), [0, 1]), "--k", "1",
                            "--output", str(c.out / "m.json")]),
        DatasetInputError, r"holds integers without class names; pass `class_names`"),
    "missing image column": Case(lambda c: c.stage1_digits("--image_column", "picture"), DatasetInputError,
                                 r"Column 'picture' \(image_column\) not found.*Pass `image_column=...`"),
    "manifest of another dataset": Case(
        lambda c: c.stage1(c.stage1_data["dataset"], c.digits_manifest, "--class_names", "zero,one"),
        DatasetInputError, r"manifest's classes .* differ from the dataset's"),
    "malformed manifest": Case(lambda c: (c.tmp / "m.json").write_text("{not json") and c.stage1_digits(
        "--few_shot_manifest", c.tmp / "m.json"), DatasetInputError, r"m\.json' cannot be read"),
    "unknown dataset preset (stage 1)": Case(lambda c: c.stage1_digits("--dataset_preset", "birds"), ValueError,
                                             r"Unknown dataset preset 'birds'. Choose one of"),
    "unknown dataset preset (stage 3)": Case(lambda c: c.stage3("--dataset_preset", "birds"), ValueError,
                                             r"Unknown dataset preset 'birds'. Choose one of"),
    "resolution not a multiple of 8": Case(lambda c: c.stage1_digits("--resolution", "30"), ValueError,
                                           r"`--resolution` = 30 is invalid: use an integer in \[8, 4096\], a "
                                           r"multiple of 8"),
    # Adapters and index files (stage 2)
    "adapter for another base model (recorded id)": Case(
        lambda c: c.stage2(c.adapters(lambda d: _edit_json(
            d / "datadream_config.json", **{"base_model.pretrained_model_name_or_path": "other-org/other-model"}))),
        GenerationInputError, r"trained on base model 'other-org/other-model'.*Pass the model stage 1 used"),
    "adapter for another base model (weight shapes)": Case(
        lambda c: c.stage2(c.adapters(_reshape_lora_weight)), GenerationInputError,
        r"0001_one.*does not fit the base model.*pass the base model stage 1 used", loads_model=True),
    "classifier adapter for another CLIP": Case(_classifier_for_another_base, ValueError,
                                                r"does not fit this model.*trained on another base model",
                                                loads_model=True),
    "missing index file": Case(lambda c: c.stage2(c.adapters(lambda d: (d / ADAPTER_INDEX_NAME).unlink())),
                               FileNotFoundError, r"No adapter_index\.json in .*train_datadream_lora\.py"),
    "malformed index file": Case(
        lambda c: c.stage2(c.adapters(lambda d: (d / ADAPTER_INDEX_NAME).write_text('{"mode": "cls",'))),
        ValueError, r"adapter_index\.json' is not valid JSON.*re-run stage 1"),
    "index entry escaping the folder": Case(
        lambda c: c.stage2(c.adapters(lambda d: _edit_json(d / ADAPTER_INDEX_NAME, **{"adapters.1": "../../etc"}))),
        ValueError, r"adapter folder '../../etc' of '1' points outside"),
    "missing adapter of a class": Case(
        lambda c: c.stage2(c.adapters(lambda d: (d / class_folder_name(1, "one") / LORA_WEIGHT_NAME).unlink())),
        GenerationInputError, r"Missing adapter for class 'one'.*Finish stage 1"),
    "unknown scheduler": Case(lambda c: c.stage2(None, "--scheduler", "NoSuchScheduler"), GenerationInputError,
                              r"`scheduler`: 'NoSuchScheduler' is not a diffusers scheduler class"),
    "zero images per class": Case(lambda c: c.stage2(None, "--images_per_class", "0"), GenerationInputError,
                                  r"`--images_per_class` = 0 is invalid: use an integer >= 1"),
    # Classifier training (stage 3)
    "lambda above 1": Case(lambda c: c.stage3("--real_loss_weight", "1.5"), ValueError,
                           r"`--real_loss_weight` = 1.5 is invalid: use a finite number in \[0, 1\] \(lambda"),
    "lambda below 0": Case(lambda c: c.stage3("--real_loss_weight=-0.2"), ValueError,
                           r"`--real_loss_weight` = -0.2 is invalid: use a finite number in \[0, 1\]"),
    "new stage-3 run into a folder holding one": Case(
        _stage3_into_a_used_folder, ValueError, r"used'.*already holds a classifier run \(checkpoint-2.*resume_from"),
    "validation split = test split": Case(lambda c: c.stage3("--validation_split", "test"), ValueError,
                                          r"both 'test': selecting the model on the test split"),
    "synthetic data with other classes": Case(_synthetic_with_other_classes, DatasetInputError,
                                              r"has classes \['cat', 'dog'\].*Generate it from the same class list"),
    "resume from a half-written checkpoint": Case(_half_written_checkpoint, ValueError,
                                                  r"checkpoint-4' is not a complete checkpoint.*'latest'",
                                                  loads_model=True),
    # Batch sizes
    "batch of 1 cannot hold real and synthetic": Case(
        lambda c: c.stage3("--synthetic_dataset", c.digits_path, "--per_device_train_batch_size", "1",
                           mode="real+synthetic"), ValueError, r"`real_samples_per_batch` must be in 1..0"),
    "batch larger than the data (stage 1: K=2, batch 8)": Case(
        lambda c: _stage1_batch_steps(c), check=lambda steps: steps == [2]),
    "batch larger than the data (stage 3: 8 real images, batch 16)": Case(
        lambda c: _stage3_batches(16), check=lambda batches: all(len(b) == 16 for b in batches)),
    # Numbers that are not finite or out of range (every field: tests/test_validation.py), refused before any work
    "NaN learning rate (stage 1)": Case(lambda c: c.stage1_digits("--learning_rate", "nan"), ValueError,
                                        r"`--learning_rate` = nan is invalid: use a finite number in \(0, 1\]"),
    "infinite gradient clipping (stage 1)": Case(lambda c: c.stage1_digits("--max_grad_norm", "inf"), ValueError,
                                                 r"`--max_grad_norm` = inf is invalid: use a finite number > 0"),
    "NaN guidance scale (stage 2)": Case(lambda c: c.stage2(None, "--guidance_scale", "nan"), GenerationInputError,
                                         r"`--guidance_scale` = nan is invalid: use a finite number >= 0"),
    "seed past 2**32 (stage 2)": Case(lambda c: c.stage2(None, "--seed", str(2**32)), GenerationInputError,
                                      r"`--seed` = 4294967296 is invalid: use an integer in \[0, 4294967295\]"),
    "NaN lambda (stage 3)": Case(lambda c: c.stage3("--real_loss_weight", "nan"), ValueError,
                                 r"`--real_loss_weight` = nan is invalid"),
    "infinite learning rate (stage 3)": Case(lambda c: c.stage3("--learning_rate", "inf"), ValueError,
                                             r"`--learning_rate` = inf is invalid: use a finite number in \(0, 1\]"),
    "NaN warm-up (stage 3)": Case(lambda c: c.stage3("--warmup_steps", "nan"), ValueError,
                                  r"`--warmup_steps` = nan is invalid: use a finite number >= 0"),
    "K of 0 (datadream-hf few-shot)": Case(lambda c: _cli_few_shot(c, k=0), ValueError,
                                           r"`--k` = 0 is invalid: use an integer >= 1"),
    # Hand-edited manifests (every kind: tests/test_validation.py), refused before the model loads
    "manifest row of another class": Case(
        lambda c: c.stage1_digits("--few_shot_manifest", _edited_manifest(c, lambda m: m["indices"].reverse())),
        DatasetInputError, r"edited\.json', class 'zero': row \d+ is labelled 'one', not 'zero'"),
    "manifest row past the end": Case(
        lambda c: c.stage1_digits("--few_shot_manifest", _edited_manifest(c, lambda m: m["indices"][1].__setitem__(
            0, 10**12))), DatasetInputError, r"edited\.json', class 'one': row 1000000000000 is past the end"),
    "negative manifest row": Case(
        lambda c: c.stage3("--few_shot_manifest", _edited_manifest(c, lambda m: m["indices"][0].__setitem__(0, -1),
                                                                   c.digits_manifest)),
        DatasetInputError, r"edited\.json': class 'zero': row -1 is not a row number"),
    # Silent skips
    "broken link in a class folder": Case(_stage1_with_broken_link, DatasetInputError,
                                          r"dog/2\.png' is a link to a missing file"),
    # Classes that would become one
    "classes differing only in case (stage 1)": Case(lambda c: c.stage1(*_case_twins(c)), ValueError,
                                                     r"Classes 'Cat' and 'cat' get prompts that differ only in case"),
    "classes differing only in accents (stage 2)": Case(
        lambda c: c.stage2(write_fake_stage1_output(c.tmp / "twins", c.tiny_sd, ["café", "cafe"])),
        ValueError, r"Classes 'café' and 'cafe' get prompts that differ only in case, accents or spacing"),
    "classes differing only in case (stage 3)": Case(lambda c: _stage3_case_twins(c), ValueError,
                                                     r"Classes 'Cat' and 'cat' get prompts that differ only in case"),
    # Damaged and mistyped outputs and adapters (raw library errors before: SafetensorError, Errno)
    "damaged adapter file (stage 2)": Case(
        lambda c: c.stage2(c.adapters(_truncate_adapter)), GenerationInputError,
        r"Adapter of class 'one' \(index 1\) \('.*0001_one/pytorch_lora_weights\.safetensors'\) cannot be read as "
        r"safetensors "
        r"\(.*\): the file is damaged"),
    "damaged classifier adapter": Case(
        _damaged_classifier, ValueError, r"Weights file \('.*classifier/adapter_model\.safetensors'\) cannot be read "
                                         r"as safetensors", loads_model=True),
    "malformed YAML config file (stage 3)": Case(_malformed_config_file, ValueError,
                                                 r"Config file '.*stage3\.yaml' cannot be read: while parsing"),
    "output dir that is a file (stage 1)": Case(lambda c: c.stage1_digits("--output_dir", _a_file(c)),
                                                OutputPathError, r"--output_dir '.*a_file' is a file; pass a folder"),
    "output dir inside a file (stage 3)": Case(
        lambda c: c.stage3("--output_dir", _a_file(c) / "run"), OutputPathError,
        r"--output_dir '.*a_file/run' cannot be made: '.*a_file' is a file, not a folder"),
    "unwritable output dir (stage 2)": Case(lambda c: c.stage2(None, "--output_dir", _unwritable(c)),
                                            OutputPathError, r"--output_dir '.*' cannot be written: .* refuses new "
                                                             r"entries"),
    "unwritable output dir (stage 1)": Case(lambda c: c.stage1_digits("--output_dir", _unwritable(c)),
                                            OutputPathError, r"--output_dir '.*' cannot be written"),
    "output dir inside the image folder it trains on (stage 1)": Case(
        lambda c: c.stage1(*map(str, folder_with(c.tmp, png_bytes(noise_image(seed=3)))), "--output_dir",
                           c.tmp / "images" / "adapters"), OutputPathError,
        r"--output_dir '.*images/adapters' is inside --dataset '.*images': the run would write its files among"),
    "output dir that is the stage-1 folder (stage 2)": Case(
        lambda c: c.stage2(None, "--output_dir", c.adapters()), OutputPathError,
        r"--output_dir '.*adapters' is a stage-1 adapter folder .*would be mixed with this run's"),
    "--save_to_disk that is a file (stage 2)": Case(lambda c: c.stage2(None, "--save_to_disk", _a_file(c)),
                                                    OutputPathError, r"--save_to_disk '.*a_file' is a file"),
    "manifest --output that is a folder (datadream-hf few-shot)": Case(
        lambda c: cli_main(["few-shot", "--dataset", c.digits_path, "--k", "1", "--output", str(c.tmp)]),
        OutputPathError, r"--output '.*' is a folder; pass a file path"),
    "tiny-world --dataset that is a file": Case(
        lambda c: cli_main(["tiny-world", "--recipe", "--dataset", str(_a_file(c))]), DatasetInputError,
        r"--dataset '.*a_file' is a file; pass a save_to_disk folder, an image folder or a Hub dataset id"),
    # --push_to_hub with the Hub offline: refused before any work (tests/test_hub.py: every other reason)
    "push_to_hub offline (stage 1)": Case(lambda c: c.stage1_digits("--push_to_hub"), HubAccessError,
                                          r"--push_to_hub: the Hub is offline \(HF_HUB_OFFLINE=1\)"),
    "push_to_hub offline (stage 2)": Case(lambda c: c.stage2(None, "--push_to_hub", "--hub_dataset_id", "u/x"),
                                          HubAccessError, r"--push_to_hub: the Hub is offline"),
    "push_to_hub offline (stage 3)": Case(lambda c: c.stage3("--push_to_hub"), HubAccessError,
                                          r"--push_to_hub: the Hub is offline"),
    # Inputs accepted but quietly not what was meant
    "K-shot image replaced under the same name": Case(
        _replaced_image, DatasetInputError,
        r"class 'dog': row 3 \('.*dog/1\.png'\) is not the image the manifest was drawn with.*the data changed"),
    "synthetic images from adapters of another K-shot draw": Case(
        _synthetic_of_another_draw, DatasetInputError,
        r"synthetic'? was generated with adapters trained on another K-shot draw \(K=4, seed 1\) than "
        r"--few_shot_manifest '.*few_shot\.json' \(K=4, seed 0\)", loads_model=True),
    "--clean_class_names alone (stage 2)": Case(
        _stage2_clean_names, check=lambda prompts: prompts == ["a photo of a big cat", "a photo of a small dog"],
        loads_model=True),
    "manifest of format 1 (no image hashes)": Case(
        _format_1_manifest, check=lambda m: m.image_sha256 is None and m.k == 2 and m.format_version == 1),
    "manifest used with another split": Case(
        lambda c: _split_folders_manifest(c, "test"), DatasetInputError,
        r"was drawn from split 'train', but --split 'test' is loaded: its rows are other images. Pass --split train"),
    "prompt template without {domain} while a domain is set": Case(
        lambda c: c.stage3("--domain", "aircraft ", "--prompt_template", "a photo of a {classname}"),
        ValueError, r"has no \{domain\} field, so the domain word 'aircraft ' .* would be left out of every prompt"),
    "prompt template with an unknown field": Case(
        lambda c: c.stage2(None, "--prompt_template", "a {style} photo of a {classname}"), ValueError,
        r"has a field other than \{domain\} and \{classname\} \(KeyError\('style'\)\)"),
    "cls index with two classes on one adapter": Case(
        lambda c: c.stage2(c.adapters(lambda d: _edit_json(d / ADAPTER_INDEX_NAME,
                                                           **{"adapters.1": class_folder_name(0, "zero")}))),
        ValueError, r"classes 'zero' and 'one' point at the same adapter folder '0000_zero'"),
}  # fmt: skip


def _stage1_batch_steps(ctx: Ctx):
    """Stage 1 with a batch larger than a class's K images trains on all of them each step (as the reference's
    DataLoader without drop_last); returns the batch sizes of a unit's first epoch."""
    from datadream_hf.adapt.data import batch_indices, make_unit

    unit = make_unit("zero", "0000_zero", 0, [noise_image(), noise_image(seed=1)], [0, 0],
                     torch.zeros(1, 4, dtype=torch.long), resolution=16)  # fmt: skip
    return [len(batch_indices(unit, 0, batch_size=8))]


def _stage3_batches(batch_size: int):
    """The stage-3 sampler with more batch slots than images cycles the images (the reference repeats the K shots)."""
    from datadream_hf.classify.data import RealSyntheticBatchSampler

    sampler = RealSyntheticBatchSampler(num_real=8, num_synthetic=0, real_per_batch=batch_size, synthetic_per_batch=0)
    return list(sampler)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Makes every base-model load fail loudly: a bad input must be refused before it."""
    import datadream_hf.adapt.train
    import datadream_hf.classify.train
    import datadream_hf.generate.run

    def expensive(*args, **kwargs):
        raise AssertionError("a base model was loaded before the bad input was refused")

    monkeypatch.setattr(datadream_hf.adapt.train, "load_generator_models", expensive)
    monkeypatch.setattr(datadream_hf.generate.run, "load_generation_pipeline", expensive)
    monkeypatch.setattr(datadream_hf.classify.train, "load_classifier", expensive)


def assert_nothing_written(folder: Path):
    written = [p for p in folder.rglob("*") if p.is_file() and p.name != LOCK_NAME] if folder.exists() else []
    assert not written, f"left behind: {written}"


@pytest.mark.parametrize("name", list(CASES))
def test_input_case(name, ctx, request):
    case = CASES[name]
    if not case.loads_model:
        request.getfixturevalue("no_model_loading")
    if case.error is None:
        result = case.run(ctx)
        if case.check is not None:
            assert case.check(result) is not False
        return
    with pytest.raises(case.error, match=case.match):
        case.run(ctx)
    assert_nothing_written(ctx.out)


def test_the_table_covers_the_issue():
    errors = [name for name, case in CASES.items() if case.error is not None]
    assert len(errors) >= 20 and len(CASES) >= 40


def test_odd_images_train_in_stage1_end_to_end(tiny_sd_path, tmp_path):
    """Grayscale, RGBA, 16-bit, palette and 1-pixel images (and a batch larger than the data) really train."""
    root = write_image_folder(tmp_path / "images", {
        "gray": [noise_image(mode="L"), noise_image(mode="LA", seed=1)],
        "deep": [sixteen_bit_image(), noise_image(mode="RGBA", seed=2)],
        "tiny": [noise_image(size=(1, 1), seed=3), noise_image(mode="P", seed=4)],
    })  # fmt: skip
    manifest = tmp_path / "manifest.json"
    draw_few_shot(load_image_folder(root), k=2, seed=0).save(manifest)
    out = tmp_path / "out"
    run_main("stage1", ["--pretrained_model_name_or_path", tiny_sd_path, "--dataset", root, "--few_shot_manifest",
                        manifest, "--output_dir", out, "--resolution", "32", "--mode", "dset", "--train_batch_size",
                        "8", "--max_train_steps", "2", "--report_to", "none"])  # fmt: skip
    weights = load_file(str(out / LORA_WEIGHT_NAME))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    images = decode_images(load_image_folder(root))
    assert all(image.mode == "RGB" for image in images)
    check_sixteen_bit(images[0])  # classes in alphabetical order: deep (16-bit first), gray, tiny


# --- 3. security ---------------------------------------------------------------------------------------------------

WEIGHT_CLASS_SUFFIXES = ("Model", "Pipeline", "KL", "ModelWithProjection")


def _python_files():
    for folder in ("datadream_hf", "training_scripts", "benchmarks"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_code_loads_weights_only_as_safetensors_and_never_trusts_remote_code():
    """A static scan of the package, scripts and benchmarks (tests excluded): no pickle loading, no remote code."""
    problems = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        # `f(**weights)` with `weights = {..., "use_safetensors": True}` in the same file counts as passing it.
        safe_dicts = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
            for key, value in zip(node.value.keys, node.value.values)
            if isinstance(key, ast.Constant)
            and key.value == "use_safetensors"
            and isinstance(value, ast.Constant)
            and value.value is True
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            receiver = function.value if isinstance(function, ast.Attribute) else None
            receiver_name = getattr(receiver, "id", getattr(receiver, "attr", ""))
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "load" and receiver_name in ("torch", "pickle", "dill", "joblib"):
                problems.append(f"{where}: {receiver_name}.load (pickle)")
            if name in ("loads", "Unpickler") and receiver_name == "pickle":
                problems.append(f"{where}: pickle.{name}")
            remote_code = keywords.get("trust_remote_code")
            if remote_code is not None and not (isinstance(remote_code, ast.Constant) and remote_code.value is False):
                problems.append(f"{where}: trust_remote_code")
            explicit, spread = keywords.get("use_safetensors"), keywords.get(None)  # None: a `**kwargs` argument
            safetensors_only = (isinstance(explicit, ast.Constant) and explicit.value is True) or (
                isinstance(spread, ast.Name) and spread.id in safe_dicts
            )
            if name == "from_pretrained" and receiver_name.endswith(WEIGHT_CLASS_SUFFIXES) and not safetensors_only:
                problems.append(f"{where}: {receiver_name}.from_pretrained without use_safetensors=True")
            if name in ("load_lora_weights", "load_adapter", "load_lora_adapter") and not safetensors_only:
                problems.append(f"{where}: {name} without use_safetensors=True")
    assert not problems, "\n".join(problems)


@pytest.fixture
def torch_load_forbidden(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was about to be unpickled")

    monkeypatch.setattr(torch, "load", refuse)


def test_pickled_weights_are_refused_by_stage2_and_the_classifier(
    tiny_sd_path, tiny_clip_path, fake_stage1, tmp_path, torch_load_forbidden
):
    from datadream_hf.classify.modeling import CLIPLoRAClassifier
    from datadream_hf.generate.sampling import load_generation_pipeline

    # Stage 2: a class folder that holds only `pytorch_lora_weights.bin`.
    adapters = tmp_path / "adapters"
    shutil.copytree(fake_stage1, adapters)
    folder = adapters / class_folder_name(1, "one")
    (folder / LORA_WEIGHT_NAME).rename(folder / "pytorch_lora_weights.bin")
    config = GenerationConfig(images_per_class=1, num_inference_steps=1)
    with pytest.raises(GenerationInputError, match=r"\['pytorch_lora_weights\.bin'\]: pickled weights can execute"):
        stage2 = GenerationArguments(
            pretrained_model_name_or_path=tiny_sd_path, adapter_path=str(adapters), output_dir=tmp_path / "out"
        )
        generate_synthetic_dataset(stage2, config)

    # Classifier: a saved adapter folder that holds only `adapter_model.bin`.
    classifier = tmp_path / "classifier"
    CLIPLoRAClassifier.from_clip_pretrained(tiny_clip_path, CLASSES).save_pretrained(classifier)
    (classifier / "adapter_model.safetensors").rename(classifier / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"Refusing to load \['adapter_model\.bin'\].*pickled weights can execute"):
        CLIPLoRAClassifier.from_pretrained(classifier)

    # Base models whose weights exist only as pickles are refused too, by stage 1, stage 2 and the classifier.
    sd = tmp_path / "pickled-sd"
    shutil.copytree(tiny_sd_path, sd)
    for weights in sd.glob("*/*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(GenerationInputError, match="safetensors"):
        load_generation_pipeline(str(sd))
    from datadream_hf.adapt.config import GeneratorTrainingConfig
    from datadream_hf.adapt.modeling import load_generator_models

    with pytest.raises(OSError):
        load_generator_models(GeneratorTrainingConfig(pretrained_model_name_or_path=str(sd)))
    clip = tmp_path / "pickled-clip"
    shutil.copytree(tiny_clip_path, clip)
    (clip / "model.safetensors").rename(clip / "pytorch_model.bin")
    with pytest.raises(OSError):
        CLIPLoRAClassifier.from_clip_pretrained(str(clip), CLASSES)


@pytest.mark.usefixtures("reachable_hub")  # the upload is checked before the run
def test_hub_token_is_never_written_by_any_stage(
    tiny_sd_path, tiny_clip_path, digits_path, digits_manifest_path, stage1_data, tmp_path, monkeypatch, capsys, caplog
):
    """Each script's main with a sentinel token, TensorBoard and checkpoints on, the Hub upload mocked: the token
    reaches the upload call, and no file under any output folder (events, checkpoints, configs, cards) nor any log
    line holds it."""
    import datasets

    import datadream_hf.hub

    uploads = []
    monkeypatch.setattr(datadream_hf.hub, "push_folder_to_hub", lambda folder, repo_id, **kw: uploads.append(kw))
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo_id, **kw: uploads.append(kw))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    caplog.set_level("INFO")

    stage1 = tmp_path / "stage1"
    run_main("stage1", stage1_args(tiny_sd_path, stage1_data, stage1) + [
        "--report_to", "tensorboard", "--max_train_steps", "2", "--num_validation_images", "1",
        "--validation_num_inference_steps", "1", "--push_to_hub", "--hub_model_id", "u/a", "--hub_token", SENTINEL,
    ])  # fmt: skip
    stage2 = tmp_path / "stage2"
    run_main("stage2", ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", stage1, "--output_dir",
                        stage2, *STAGE2_FLAGS, "--push_to_hub", "--hub_dataset_id", "u/b",
                        f"--hub_token={SENTINEL}"])  # fmt: skip
    stage3 = tmp_path / "stage3"
    script = load_script("stage3")
    hub = ["--push_to_hub", "--hub_model_id", "u/c", "--hub_token", SENTINEL]
    args = stage3_args(tiny_clip_path, digits_path, digits_manifest_path, stage3, "--max_steps", "2", *hub)
    args += ["--report_to", "tensorboard"]
    script.main(script.parse_args([str(a) for a in args]))

    assert [kw.get("token") for kw in uploads] == [SENTINEL] * 4  # stage 1, stage 2 card + Parquet, stage 3
    files = [p for folder in (stage1, stage2, stage3) for p in folder.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in files) and any("checkpoint-" in str(p) for p in files)
    leaks = [p for p in files if SENTINEL.encode() in p.read_bytes()]
    assert not leaks, f"token written to {leaks}"
    captured = capsys.readouterr()
    assert SENTINEL not in captured.out + captured.err + caplog.text


def test_hostile_class_names_stay_inside_the_output_folders(digits, tiny_sd_path, tiny_clip_path, tmp_path):
    """Class names that look like paths go through stage 1 (cls), stage 2 and the classifier: every file lands inside
    the output folders, and the names themselves survive unchanged into labels and prompts."""
    from datadream_hf.classify.modeling import CLIPLoRAClassifier
    from datadream_hf.synthetic import load_synthetic_dataset

    names = ["a/b", "..", "../../escape", "/etc/passwd", "with space", "Café ✈ 飞机", "y" * 300]
    rows = digits["train"].select(range(2 * len(names)))
    dataset = Dataset.from_dict(
        {"image": rows["image"], "label": [names[i // 2] for i in range(len(rows))]},
        features=Features({"image": ImageFeature(), "label": Value("string")}),
    )
    dataset.save_to_disk(str(tmp_path / "data"))
    normalized = load_labelled_dataset(str(tmp_path / "data"))
    manifest = tmp_path / "manifest.json"
    draw_few_shot(normalized, k=2, seed=0).save(manifest)
    before = set(tmp_path.parent.rglob("*"))

    stage1, stage2 = tmp_path / "runs" / "stage1", tmp_path / "runs" / "stage2"
    run_main("stage1", ["--pretrained_model_name_or_path", tiny_sd_path, "--dataset", tmp_path / "data",
                        "--few_shot_manifest", manifest, "--output_dir", stage1, "--resolution", "32",
                        "--max_train_steps", "1", "--train_batch_size", "2", "--report_to", "none"])  # fmt: skip
    config = GenerationConfig(images_per_class=1, num_inference_steps=1, shard_size=1)
    generate_synthetic_dataset(
        GenerationArguments(pretrained_model_name_or_path=tiny_sd_path, adapter_path=str(stage1), output_dir=stage2),
        config,
    )

    created = set(tmp_path.parent.rglob("*")) - before
    outside = [p for p in created if not p.resolve().is_relative_to((tmp_path / "runs").resolve())]
    assert not outside, f"written outside the output folders: {outside}"
    class_names = normalized.features["label"].names
    folders = [class_folder_name(i, name) for i, name in enumerate(class_names)]
    assert sorted(p.name for p in stage1.iterdir() if p.is_dir()) == sorted(folders)
    assert sorted(p.name for p in (stage2 / "shards").iterdir()) == sorted(folders)
    assert list(read_adapter_index(stage1)["adapters"].values()) == folders

    synthetic = load_synthetic_dataset(stage2, cache_dir=str(tmp_path / "cache"))
    assert synthetic.features["label"].names == class_names == sorted(names)
    assert {row["prompt"] for row in synthetic} == {f"a photo of a {name}" for name in names}
    classifier = CLIPLoRAClassifier.from_clip_pretrained(tiny_clip_path, class_names).eval()
    logits = classifier(pixel_values=torch.zeros(2, 3, 32, 32)).logits
    assert logits.shape == (2, len(names)) and torch.isfinite(logits).all()


# --- 4. one run per output folder ---------------------------------------------------------------------------------


def test_every_stage_refuses_an_output_folder_another_run_holds(
    tiny_sd_path, tiny_clip_path, digits_path, digits_manifest_path, stage1_data, fake_stage1, tmp_path
):
    folders = {stage: tmp_path / stage for stage in ("stage1", "stage2", "stage3")}
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom datadream_hf.run_folder import OutputDirLock\n"
         "locks = [OutputDirLock(p) for p in sys.argv[1:]]\n"
         "for lock in locks: lock.acquire()\n"
         "print('held', flush=True)\ntime.sleep(120)\n", *map(str, folders.values())],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"in use by another run \(pid {holder.pid}\).*another --output_dir"
        with pytest.raises(OutputDirLockedError, match=busy):
            run_main("stage1", stage1_args(tiny_sd_path, stage1_data, folders["stage1"]))
        with pytest.raises(OutputDirLockedError, match=busy):
            run_main("stage2", ["--pretrained_model_name_or_path", tiny_sd_path, "--adapter_path", fake_stage1,
                                "--output_dir", folders["stage2"], *STAGE2_FLAGS])  # fmt: skip
        with pytest.raises(OutputDirLockedError, match=busy):
            run_main("stage3", stage3_args(tiny_clip_path, digits_path, digits_manifest_path, folders["stage3"]))
    finally:
        holder.kill()
        holder.wait()
    for folder in folders.values():
        assert_nothing_written(folder)


def test_a_format_1_manifest_loads_and_warns_once_that_its_images_are_unchecked(digits, digits_manifest_path,
                                                                                tmp_path, caplog):  # fmt: skip
    payload = json.loads(Path(digits_manifest_path).read_text())
    assert payload["format_version"] == 2 and len(payload["image_sha256"][0]) == payload["k"]
    del payload["image_sha256"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**payload, "format_version": 1}))
    old = FewShotManifest.load(path)
    with caplog.at_level("WARNING"):
        old.select(digits["train"])
        old.complement(digits["train"])
    warnings = [r.getMessage() for r in caplog.records if "records no image hashes" in r.getMessage()]
    assert len(warnings) == 1 and "old.json" in warnings[0] and "datadream-hf few-shot" in warnings[0]
