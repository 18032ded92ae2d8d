"""Helpers of the `benchmarks/` scripts: timing, peak memory, stand-in class adapters and a full-size random SD 2.1.

They measure; they change nothing in training or generation. Timings synchronize the GPU; CPU memory is the sampled
process RSS, because torch's CPU tensors are allocated outside Python's allocator (tracemalloc does not see them).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: the lifetime peak is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    """Wall time and peak memory of a block (`with measure(device) as m: ...`)."""

    device: str
    seconds: float = 0.0
    peak_bytes: int = 0
    start_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def peak_above_start_mib(self) -> float:
        return (self.peak_bytes - self.start_bytes) / 2**20

    @property
    def memory_kind(self) -> str:
        return "cuda max_memory_allocated" if self.device == "cuda" else "process RSS (sampled every 5 ms)"


class measure:
    """Context manager: wall time (GPU synchronized) and peak memory (GPU allocator peak, or sampled RSS on CPU)."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.005):
        self.result = Measurement(torch.device(device).type)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.result.peak_bytes = max(self.result.peak_bytes, _rss_bytes())

    def __enter__(self) -> Measurement:
        synchronize(self.result.device)
        if self.result.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.result.start_bytes = torch.cuda.memory_allocated()
        else:
            self.result.start_bytes = self.result.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        synchronize(self.result.device)
        self.result.seconds = time.perf_counter() - self._start
        if self.result.device == "cuda":
            self.result.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.result.peak_bytes = max(self.result.peak_bytes, _rss_bytes())


class StepClock:
    """A stage-1 `step_callback` that timestamps every step of every unit (class adapter), GPU synchronized.

    `seconds_per_class_step()` is the steady-state cost of one class's step: the wall time covered by the units' spans
    from their first to their last step (units trained together share one span) over the class-steps in those spans.
    One-off work (model loads, latent caches, exports, each unit's first step) falls outside the spans, so the ratio of
    two clocks is what the paper's 400 steps per class approach, whatever the benchmark's step count.
    """

    def __init__(self, device: torch.device | str):
        self.device = device
        self.times: dict[str, list[float]] = {}

    def __call__(self, unit, steps_done: int) -> None:
        synchronize(self.device)
        self.times.setdefault(unit.folder, []).append(time.perf_counter())

    def seconds_per_class_step(self) -> float:
        spans = sorted((times[0], times[-1]) for times in self.times.values() if len(times) > 1)
        class_steps = sum(len(times) - 1 for times in self.times.values())
        if not class_steps:
            raise ValueError("Steady-state timing needs at least 2 steps per class (--max_train_steps >= 2).")
        covered, covered_until = 0.0, float("-inf")
        for start, stop in spans:  # length of the union of the spans
            covered += max(0.0, stop - max(start, covered_until))
            covered_until = max(covered_until, stop)
        return covered / class_steps


def max_adapter_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max abs difference, relative 2-norm difference of the LoRA B/up factors) between two adapter state dicts."""
    if set(first) != set(second):
        raise ValueError(f"Adapters hold different keys: {sorted(set(first) ^ set(second))[:3]}.")
    max_abs = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
    ups = [k for k in first if k.endswith(("up.weight", "lora_B.weight"))]
    diff = torch.cat([(first[k].float() - second[k].float()).flatten() for k in ups]).norm()
    norm = torch.cat([first[k].float().flatten() for k in ups]).norm()
    return max_abs, (diff / norm).item() if norm > 0 else float(diff)


@torch.no_grad()
def write_random_class_adapters(models, output_dir: str | os.PathLike, class_names: list[str], seed: int = 0,
                                up_std: float = 0.02) -> Path:  # fmt: skip
    """Writes a cls-mode stage-1 folder of stand-in adapters (random A, small random B) for generation timing.

    `models` is a `GeneratorModels` (its peft adapter is overwritten). Writes the index and each class's
    `pytorch_lora_weights.safetensors`; generation cost does not depend on what the weights learned.
    """
    from ..adapt.modeling import save_adapter_atomic
    from ..adapter_index import ADAPTER_INDEX_NAME, adapter_index
    from ..files import write_json_atomic
    from ..run_folder import class_folder_name

    output_dir = Path(output_dir)
    generator = torch.Generator().manual_seed(seed)
    for index, name in enumerate(class_names):
        _random_lora_(models, seed + index, generator, up_std)
        save_adapter_atomic(models, output_dir / class_folder_name(index, name))
    write_json_atomic(output_dir / ADAPTER_INDEX_NAME, adapter_index("cls", class_names))
    return output_dir


def write_random_image_adapters(models, output_dir: str | os.PathLike, class_names: list[str], k: int, seed: int = 0,
                                up_std: float = 0.02) -> Path:  # fmt: skip
    """Writes an image-mode (LoFT) stage-1 folder of stand-in adapters, `k` per class, as if trained on made-up rows
    `k * class + j`; `models` (a `GeneratorModels`) sets their placement and rank."""
    from ..adapt.modeling import save_adapter_atomic
    from ..adapter_index import ADAPTER_INDEX_NAME, image_adapter_index
    from ..files import write_json_atomic

    output_dir = Path(output_dir)
    generator = torch.Generator().manual_seed(seed)
    index = image_adapter_index(class_names, [[k * c + j for j in range(k)] for c in range(len(class_names))])
    for number, folder in enumerate(index["adapters"].values()):
        _random_lora_(models, seed + number, generator, up_std)
        save_adapter_atomic(models, output_dir / folder)
    write_json_atomic(output_dir / ADAPTER_INDEX_NAME, index)
    return output_dir


@torch.no_grad()
def _random_lora_(models, unit_seed: int, generator: torch.Generator, up_std: float) -> None:
    """Every LoRA layer of `models`: A from peft's init under `unit_seed`, B random with std `up_std` (non-zero)."""
    from ..adapt.modeling import init_lora_weights_
    from ..lora import ADAPTER_NAME

    init_lora_weights_(models, "gaussian", unit_seed)
    for model in (models.denoiser, *models.text_encoders.values()):
        for module in model.modules():
            if hasattr(module, "lora_B") and ADAPTER_NAME in getattr(module, "lora_B", {}):
                weight = module.lora_B[ADAPTER_NAME].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * up_std)


RANDOM_SD21_BASE = "random-sd21-base"  # `--pretrained_model_name_or_path` value of the benchmarks: see below
RANDOM_SDXL_BASE = "random-sdxl-base"
RANDOM_SD3_MEDIUM = "random-sd3-medium"


def benchmark_model(name_or_path: str | None, work_dir: Path, device: str) -> tuple[str, bool]:
    """The benchmarks' model: (path or id, whether it is the tiny test model).

    None builds the tiny test model; a name of `RANDOM_GENERATORS` builds that real model's architecture with random
    weights (real-size timings and memory without a download); anything else is used as given.
    """
    from ..testing import save_tiny_stable_diffusion

    if name_or_path is None:
        return save_tiny_stable_diffusion(Path(work_dir) / "tiny-sd"), True
    if name_or_path in RANDOM_GENERATORS:
        return save_random_generator(name_or_path, Path(work_dir) / name_or_path, device=device), False
    return name_or_path, False


def build_random_sd21_base(device: str = "cuda", seed: int = 0):
    """A pipeline with Stable Diffusion 2.1-base's architecture (865M UNet, OpenCLIP-H-sized text encoder, 512 px)
    and random weights. The tokenizer is the tiny test one (its vocabulary sizes the embedding); the cost per token is
    the same."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ..testing import build_tiny_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
        vae = _random_vae(latent_channels=4, sample_size=512)
        text_encoder = _random_clip_text(tokenizer, 1024, 23, 16, "gelu", projection=False, projection_dim=512)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _random_vae(**overrides):
    """The SD/SDXL/SD3 autoencoder's architecture (83M parameters) with random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        **overrides,
    )


def _random_clip_text(
    tokenizer, hidden_size: int, layers: int, heads: int, act: str, projection: bool, projection_dim: int | None = None
):
    """A CLIP text encoder of the given width and depth (CLIP-L: 768/12/12, OpenCLIP-bigG: 1280/32/20)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_attention_heads=heads,
        num_hidden_layers=layers, projection_dim=projection_dim or hidden_size, hidden_act=act,
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_random_sdxl_base(device: str = "cuda", seed: int = 0):
    """A pipeline with stable-diffusion-xl-base-1.0's architecture (2.6B UNet, CLIP-L and OpenCLIP-bigG text encoders,
    1024 px) and random weights; the tokenizers are the tiny test one (see `build_random_sd21_base`)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from ..testing import build_tiny_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + bigG's pooled 1280
        )
        vae = _random_vae(latent_channels=4, sample_size=1024, scaling_factor=0.13025)
        text_encoder = _random_clip_text(tokenizer, 768, 12, 12, "quick_gelu", projection=False)
        text_encoder_2 = _random_clip_text(tokenizer, 1280, 32, 20, "gelu", projection=True)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_tiny_clip_tokenizer(), unet=unet, scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip


def build_random_sd3_medium(device: str = "cuda", seed: int = 0):
    """A pipeline with stable-diffusion-3-medium's architecture (2B MMDiT, CLIP-L and OpenCLIP-bigG text
    encoders, no T5, 16-channel VAE, 1024 px) and random weights; the tokenizers are the tiny test one."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from ..testing import build_tiny_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=192,
        )  # fmt: skip
        vae = _random_vae(latent_channels=16, sample_size=1024, shift_factor=0.0609, scaling_factor=1.5035,
                          use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
        text_encoder = _random_clip_text(tokenizer, 768, 12, 12, "quick_gelu", projection=True)
        text_encoder_2 = _random_clip_text(tokenizer, 1280, 32, 20, "gelu", projection=True)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


RANDOM_GENERATORS = {
    RANDOM_SD21_BASE: build_random_sd21_base,
    RANDOM_SDXL_BASE: build_random_sdxl_base,
    RANDOM_SD3_MEDIUM: build_random_sd3_medium,
}  # `--pretrained_model_name_or_path` value of the benchmarks -> (device, seed) -> the pipeline, random weights


def save_random_generator(name: str, path: str | os.PathLike, device: str = "cuda", seed: int = 0) -> str:
    """Builds `RANDOM_GENERATORS[name]` on `device` (random init on a GPU: seconds instead of minutes) and saves it to
    `path` as safetensors; returns the path."""
    RANDOM_GENERATORS[name](device, seed).save_pretrained(str(path), safe_serialization=True)
    return str(path)
