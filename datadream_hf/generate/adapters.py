"""Stage-1 adapters as stage 2 sees them: found locally or on the Hub, checked against the base model before any
image is made, and switched in a pipeline by fusing them into the base weights (one per class; the per-image adapters
of LoFT are mixed per sample instead, `generate.fusion`)."""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapter_index import read_adapter_index
from ..errors import InputError
from ..families import GeneratorFamily, family_of_pipeline
from ..files import check_safetensors, file_sha256
from ..lora import LORA_WEIGHT_NAME, pickled_weight_files
from ..run_folder import TRAINING_CONFIG_NAME
from ..sources import check_source
from .config import GenerationInputError

logger = logging.getLogger(__name__)

# Suffixes of LoRA factors in diffusers-format files (old and peft spellings) -> which factor they are.
LORA_FACTOR_SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
}


def _trained_base_model(training_config: dict) -> tuple[str | None, str | None]:
    """(id, revision) of the base model a stage-1 config names, whichever spelling it uses."""
    base = training_config.get("base_model")
    if isinstance(base, dict):
        name = base.get("pretrained_model_name_or_path") or base.get("id") or base.get("name_or_path")
        return name, base.get("revision")
    name = training_config.get("pretrained_model_name_or_path") or (base if isinstance(base, str) else None)
    return name, training_config.get("revision")


def _same_model(a: str, b: str) -> bool:
    def normalize(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.is_dir() else name.rstrip("/")

    return normalize(a) == normalize(b)


@dataclass(frozen=True)
class ImageAdapter:
    """One adapter of an image-mode stage-1 output: its key in `adapter_index.json`, the dataset row of the K-shot
    image it was trained on, and its folder under the output."""

    key: str
    row: int
    folder: str


@dataclass
class AdapterSet:
    """Which LoRA adapter each class uses: a stage-1 output (`dset`: one for all, `cls`: one per class, `image`: one
    per K-shot image, LoFT) or none."""

    mode: str
    class_names: list[str]
    root: Path | None = None
    source: str | None = field(default=None, metadata={"help": "What the user passed: local folder or Hub repo id."})
    revision: str | None = field(default=None, metadata={"help": "Hub commit the files came from."})
    folders: list[str] = field(default_factory=list, metadata={"help": "folders[c]: class c's folder under root."})
    training_config: dict = field(default_factory=dict)
    images: list[list[ImageAdapter]] = field(
        default_factory=list, metadata={"help": "images[c]: class c's per-image adapters (image mode only)."}
    )

    @classmethod
    def none(cls, class_names: list[str]) -> AdapterSet:
        return cls(mode="none", class_names=list(class_names))

    def weight_file(self, class_index: int) -> Path | None:
        """The adapter fused in for class `class_index`; None for none (the base model) and in image mode, where
        the class's per-image adapters (`image_weight_files`) are mixed per sample instead."""
        if self.mode in ("none", "image"):
            return None
        return self.root / self.folders[class_index] / LORA_WEIGHT_NAME

    def image_weight_files(self, class_index: int) -> list[Path]:
        """Image mode: class `class_index`'s per-image adapter files, in the index's order."""
        return [self.root / image.folder / LORA_WEIGHT_NAME for image in self.images[class_index]]

    def weight_files(self) -> list[Path]:
        """Every adapter file of the set, once each."""
        classes = range(len(self.class_names))
        if self.mode == "image":
            return [file for c in classes for file in self.image_weight_files(c)]
        return list(dict.fromkeys(file for c in classes if (file := self.weight_file(c)) is not None))

    def adapter_id(self, class_index: int, folder: str | None = None) -> str:
        """Class `class_index`'s adapter (or its folder of per-image adapters), or the adapter in `folder`."""
        if self.mode == "none":
            return "none (frozen base model)"
        folder = self.folders[class_index] if folder is None else folder
        source = self.source + (f"@{self.revision}" if self.revision else "")
        return source if folder == "." else f"{source}/{folder}"

    def describe(self) -> dict:
        hashes = {file: file_sha256(file) for file in self.weight_files()}
        per_class = []
        for c in range(len(self.class_names)):
            file = self.weight_file(c)
            entry = {
                "id": self.adapter_id(c),
                "folder": self.folders[c] if self.folders else None,
                "sha256": hashes.get(file),
            }
            if self.mode == "image":
                files = self.image_weight_files(c)
                entry["sha256"] = [hashes[f] for f in files]
                entry["images"] = [
                    {"key": image.key, "row": image.row, "id": self.adapter_id(c, image.folder), "sha256": hashes[f]}
                    for image, f in zip(self.images[c], files)
                ]
            per_class.append(entry)
        return {"mode": self.mode, "source": self.source, "revision": self.revision, "per_class": per_class}


def resolve_adapters(
    adapter_path: str, revision: str | None = None, token: str | None = None, cache_dir: str | None = None
) -> AdapterSet:
    """Reads a stage-1 output from a local folder or a Hub repo id (only its JSON and safetensors files are fetched).

    Checks that every class has a safetensors adapter file; pickled weights are refused, never loaded.
    """
    resolved_revision = None
    # A mistyped local path fails here at once (and a Hub id in offline mode with no cached copy).
    if check_source(adapter_path, "--adapter_path") == "local":
        root = Path(adapter_path).expanduser()
        if not root.is_dir():
            raise GenerationInputError(
                f"`adapter_path` {adapter_path!r} is a file: pass the --output_dir of train_datadream_lora.py."
            )
    else:
        from huggingface_hub import snapshot_download

        try:
            root = Path(
                snapshot_download(
                    adapter_path,
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    allow_patterns=["*.json", "*.safetensors"],
                )
            )
        except Exception as err:  # unknown repo, gated, unreachable...: all mean "no adapters from there"
            raise GenerationInputError(
                f"`adapter_path` {adapter_path!r} is not a local folder and could not be fetched from the Hub "
                f"({type(err).__name__}: {err}). Pass the stage-1 --output_dir or a reachable Hub repo id."
            ) from err
        resolved_revision = root.name  # snapshot folders are named by commit hash
    index = read_adapter_index(root)
    names = index["class_names"]
    images: list[list[ImageAdapter]] = []
    if index["mode"] == "dset":
        folders = [index["adapters"]["all"]] * len(names)
    elif index["mode"] == "image":
        images = [[] for _ in names]
        for key, folder in index["adapters"].items():
            image = index["images"][key]
            images[image["class"]].append(ImageAdapter(key=key, row=image["row"], folder=folder))
        folders = [str(Path(adapters[0].folder).parent) for adapters in images]
    else:
        folders = [index["adapters"][str(c)] for c in range(len(names))]
    expected = [(f"class {names[c]!r} (index {c})", folder) for c, folder in enumerate(folders) if not images]
    expected += [
        (f"class {names[c]!r}, image row {image.row} (adapter {image.key})", image.folder)
        for c, class_images in enumerate(images)
        for image in class_images
    ]
    for what, folder in expected:
        file = root / folder / LORA_WEIGHT_NAME
        if file.is_file():
            _check_readable(file, what if index["mode"] != "dset" else "every class (dset mode)")
            continue
        pickles = pickled_weight_files(root / folder)
        if pickles:
            raise GenerationInputError(
                f"Adapter of {what} in {str(root / folder)!r} is only available as {pickles}: pickled "
                f"weights can execute code and are not loaded. Convert it to {LORA_WEIGHT_NAME} (safetensors)."
            )
        raise GenerationInputError(
            f"Missing adapter for {what}: no {LORA_WEIGHT_NAME} in {str(root / folder)!r}. "
            "Finish stage 1 for that class or fix adapter_index.json."
        )
    training_config = {}
    config_path = root / TRAINING_CONFIG_NAME
    if config_path.is_file():
        try:
            training_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise GenerationInputError(f"{str(config_path)!r} is not valid JSON ({err}); restore it from stage 1.")
    else:
        logger.warning(f"No {TRAINING_CONFIG_NAME} in {root}: the adapters' base model is checked by shapes only.")
    return AdapterSet(
        mode=index["mode"],
        class_names=list(names),
        root=root,
        source=str(adapter_path),
        revision=resolved_revision,
        folders=folders,
        training_config=training_config,
        images=images,
    )


def _check_readable(file: Path, what: str) -> None:
    """Refuses the adapter file of `what` (e.g. "class 'cat' (index 3)") that safetensors cannot open (truncated,
    overwritten, not safetensors), before any model loads; its tensors' shapes and values are checked against the base
    model later (`check_adapters_fit`)."""
    try:
        check_safetensors(file, f"Adapter of {what}", "Restore it, or train it again in stage 1.")
    except InputError as err:
        raise GenerationInputError(str(err)) from None


def check_class_names(adapters: AdapterSet, class_names: list[str] | None) -> None:
    if class_names is not None and list(class_names) != adapters.class_names:
        raise GenerationInputError(
            f"`class_names` {list(class_names)[:5]}... differ from the adapters' classes "
            f"{adapters.class_names[:5]}... "
            f"(from {adapters.source}). Leave class_names unset to use the adapters' classes, in their order."
        )
    if len(set(adapters.class_names)) != len(adapters.class_names) or not adapters.class_names:
        raise GenerationInputError(f"Class names must be unique and non-empty, got {adapters.class_names[:10]}.")


def check_adapters_fit(
    pipeline,
    adapters: AdapterSet,
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    allow_base_model_mismatch: bool = False,
) -> None:
    """Refuses adapters made for another base model: by the id stage 1 recorded, and by every LoRA weight's shape."""
    check_base_model_id(adapters, pretrained_model_name_or_path, revision, allow_base_model_mismatch)
    components = family_of_pipeline(pipeline).pipeline_lora_components(pipeline)
    for file in sorted(adapters.weight_files()):
        _check_lora_shapes(file, components)


def check_base_model_id(
    adapters: AdapterSet,
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    allow_base_model_mismatch: bool = False,
) -> None:
    """Refuses adapters whose stage-1 config names another base model (id or revision) than the one given."""
    trained_id, trained_revision = _trained_base_model(adapters.training_config)
    if trained_id and not allow_base_model_mismatch:
        if not _same_model(trained_id, pretrained_model_name_or_path) or (
            trained_revision and revision and trained_revision != revision
        ):
            raise GenerationInputError(
                f"The adapters in {adapters.source!r} were trained on base model {trained_id!r}"
                f"{f' (revision {trained_revision})' if trained_revision else ''}, not on "
                f"{pretrained_model_name_or_path!r}{f' (revision {revision})' if revision else ''}. Pass the model "
                "stage 1 used, or --allow_base_model_mismatch if it is the same model under another name."
            )


def check_adapter_family(adapters: AdapterSet, family: GeneratorFamily) -> None:
    """Refuses adapters whose stage-1 run recorded another generator family than the base model's (before loading
    it): an SDXL adapter has no place in an SD3 transformer, whatever the id."""
    trained = (adapters.training_config.get("generator_family") or {}).get("pipeline_class")
    if trained and trained != family.pipeline_class_name:
        raise GenerationInputError(
            f"The adapters in {adapters.source!r} were trained on a {trained}, but the base model is a "
            f"{family.pipeline_class_name}: pass a base model of the family stage 1 trained on."
        )


def _check_lora_shapes(file: Path, components: dict[str, torch.nn.Module]) -> None:
    found = 0
    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            suffix = next((s for s in LORA_FACTOR_SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                continue
            component_name, _, module_path = key[: -len(suffix)].partition(".")
            component = components.get(component_name)
            if component is None:
                raise GenerationInputError(
                    f"Adapter {str(file)!r} has LoRA weight {key!r} for {component_name!r}; the base pipeline only "
                    f"has {list(components)}. Was it trained for another model family?"
                )
            try:
                module = component.get_submodule(module_path)
            except AttributeError:
                try:  # transformers < 5 wrapped the text encoder in `.text_model`
                    module = component.get_submodule(module_path.removeprefix("text_model."))
                except AttributeError:
                    raise GenerationInputError(
                        f"Adapter {str(file)!r} has LoRA weight {key!r} but the base model has no module "
                        f"{component_name}.{module_path}: the adapter was trained for another base model."
                    ) from None
            shape = tuple(f.get_slice(key).get_shape())
            weight_shape = tuple(module.weight.shape)  # (out, in, ...)
            fits = (
                shape[1] == weight_shape[1] if LORA_FACTOR_SUFFIXES[suffix] == "down" else shape[0] == weight_shape[0]
            )
            if not fits:
                raise GenerationInputError(
                    f"Adapter {str(file)!r} does not fit the base model: LoRA weight {key!r} has shape {shape} but "
                    f"{component_name}.{module_path} has weight shape {weight_shape}. The adapter was trained for "
                    "another base model; pass the base model stage 1 used."
                )
            if not bool(f.get_tensor(key).isfinite().all()):
                raise GenerationInputError(
                    f"Adapter {str(file)!r} holds NaN or inf in LoRA weight {key!r}: it would make NaN images. Its "
                    "stage-1 training diverged or the file is damaged; train that adapter again."
                )
            found += 1
    if not found:
        raise GenerationInputError(f"Adapter {str(file)!r} holds no LoRA weights in diffusers format.")


@dataclass
class LoraFactor:
    """One targeted linear layer's LoRA: down (r, in) and up (out, r) as the file holds them, and alpha / r."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float


def read_lora_factors(weight_file: Path, pipeline) -> dict[tuple[str, str], LoraFactor] | None:
    """(component, module name in the pipeline) -> its `LoraFactor`, of a stage-1 adapter file (diffusers keys + r /
    lora_alpha metadata); None for a layout this does not read exactly (no r/alpha metadata, rank or alpha patterns,
    other keys: DoRA, alphas), which only diffusers' own `load_lora_weights` reads."""
    with safe_open(str(weight_file), "pt") as f:
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    components = family_of_pipeline(pipeline).pipeline_lora_components(pipeline)  # name -> module
    plain = {f"{c}.{k}" for c in components for k in ("r", "lora_alpha", "target_modules")}
    if not tensors or any(value for key, value in metadata.items() if key not in plain):
        return None
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in LORA_FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            return None
        component, _, path = key[: -len(suffix)].partition(".")
        pairs.setdefault((component, path), {})[LORA_FACTOR_SUFFIXES[suffix]] = tensor
    factors = {}
    for (component, path), pair in pairs.items():
        rank, alpha = metadata.get(f"{component}.r"), metadata.get(f"{component}.lora_alpha")
        model = components.get(component)
        if rank is None or alpha is None or model is None or set(pair) != {"down", "up"}:
            return None
        for name in (path, path.removeprefix("text_model.")):  # transformers < 5 wrapped `.text_model`
            module = model.get_submodule(name) if _has_submodule(model, name) else None
            if isinstance(module, torch.nn.Linear):
                break
        else:
            return None
        factors[(component, name)] = LoraFactor(down=pair["down"], up=pair["up"], scaling=alpha / rank)
    return factors


class FusedAdapterSwitcher:
    """Puts one LoRA adapter at a time into a pipeline, fused into the base weights (no LoRA cost per step).

    Switching restores the base weights from a copy taken before the first fuse instead of unfusing: W + BA - BA != W
    in floating point, so unfusing would let the base drift and make images depend on which classes came before.
    A stage-1 file (diffusers keys + r/alpha metadata) is fused directly, W = W0 + (alpha / r) * up @ down from the
    file's tensors, peft's own fuse formula without injecting peft layers first: measured on the tiny pipeline (CPU),
    0.01 s per switch instead of 0.1 s for diffusers' `load_lora_weights` + `fuse_lora` + unload, which remains the
    path for any other file layout. Sampling is as fast as the base pipeline; keeping all adapters loaded and calling
    `set_adapters` switches in 0.004 s but samples ~20% slower.
    """

    ADAPTER_NAME = "datadream_class"
    _by_pipeline: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_pipeline(cls, pipeline) -> FusedAdapterSwitcher:
        """The pipeline's one switcher: two switchers on a pipeline would each think they own its weights."""
        if pipeline not in cls._by_pipeline:
            cls._by_pipeline[pipeline] = cls(pipeline)
        return cls._by_pipeline[pipeline]

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.components = family_of_pipeline(pipeline).pipeline_lora_components(pipeline)  # name -> module
        self.active: Path | None = None
        self._base_weights: dict[tuple[str, str], torch.Tensor] = {}
        self._peft_loaded = False  # the active adapter went through diffusers' load_lora_weights

    def _lora_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for component, model in self.components.items():
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    yield component, name, module

    def use(self, weight_file: Path | None) -> None:
        """Makes `weight_file`'s adapter the active one (None: the plain base model)."""
        if weight_file == self.active:
            return
        self.reset()
        if weight_file is None:
            return
        deltas = self._read_deltas(weight_file)
        if deltas is not None:
            for (component, name), delta in deltas.items():
                weight = getattr(self.pipeline, component).get_submodule(name).weight
                base = self._base_weights.setdefault((component, name), weight.detach().clone())
                weight.data.copy_((base.float() + delta).to(base.dtype))
            self.active = weight_file
            return
        # use_safetensors=True also turns off diffusers' fallback to a pickled file of the same adapter.
        self.pipeline.load_lora_weights(
            str(weight_file.parent), weight_name=weight_file.name, adapter_name=self.ADAPTER_NAME, use_safetensors=True
        )
        components = set()
        for component, name, module in self._lora_layers():
            components.add(component)
            # Copied while still unfused; the copy is kept for the whole run, so it is always the pristine base.
            self._base_weights.setdefault((component, name), module.get_base_layer().weight.detach().clone())
        self.pipeline.fuse_lora(components=sorted(components), adapter_names=[self.ADAPTER_NAME])
        self.active = weight_file
        self._peft_loaded = True

    def _read_deltas(self, weight_file: Path) -> dict[tuple[str, str], torch.Tensor] | None:
        """(component, module) -> (alpha / r) * up @ down, (out, in) in fp32, of a stage-1 adapter file; None for a
        layout `read_lora_factors` does not read exactly."""
        factors = read_lora_factors(weight_file, self.pipeline)
        if factors is None:
            return None
        deltas = {}
        for key, factor in factors.items():
            # On the weights' device: on a GPU, 200 CPU matmuls would make the switch ~10x slower.
            device = getattr(self.pipeline, key[0]).get_submodule(key[1]).weight.device
            up, down = factor.up.to(device, torch.float32), factor.down.to(device, torch.float32)  # (out, r), (r, in)
            deltas[key] = (up @ down) * factor.scaling  # peft's get_delta_weight, in fp32
        return deltas

    def reset(self) -> None:
        """Back to the exact base weights."""
        if self.active is None:
            return
        if self._peft_loaded:
            self.pipeline.unload_lora_weights()  # removes the LoRA layers; the fused base layers stay in place
            self._peft_loaded = False
        for (component, name), weight in self._base_weights.items():
            getattr(self.pipeline, component).get_submodule(name).weight.data.copy_(weight)
        self.active = None


def _has_submodule(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
