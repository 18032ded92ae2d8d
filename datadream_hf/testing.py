"""Tiny, offline, deterministic stand-ins for Stable Diffusion 2.1-base (and SDXL, SD 3.5) and CLIP ViT-B/16.

Every builder here makes real diffusers / transformers objects from configs under a fixed seed, so the
scripts run on them exactly as they would on `stabilityai/stable-diffusion-2-1-base` or
`openai/clip-vit-base-patch16`: save them with `save_pretrained` and pass the folder as the model id. Their weights
are random: they test the plumbing, not the method (the tiny world's pre-trained models, `tiny_world.world`, do).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
)

TINY_IMAGE_SIZE = 32
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

# Words the tiny tokenizer merges into whole tokens; anything else still tokenizes, byte by byte.
TINY_VOCAB_WORDS = (
    "a photo of an the digit zero one two three four five six seven eight nine aircraft car satellite food "
    "texture pet flower scene image picture handwritten number class"
).split()


def build_tiny_clip_tokenizer(model_max_length: int = 77, words: Sequence[str] = TINY_VOCAB_WORDS) -> CLIPTokenizer:
    """A real byte-level BPE `CLIPTokenizer` with merges that spell out `words` (no download). Most words become one
    token; a word whose letter pairs an earlier word's merges claim first stays a few (e.g. `slan te d`)."""
    # alphabet() comes from a Rust HashSet: its order changes from call to call, so sort it for stable token ids.
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = list(SPECIAL_TOKENS) + byte_chars + [c + "</w>" for c in byte_chars]
    merges = []
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair = (merged, piece)
            merged = merged + piece
            if merged not in tokens:
                tokens.append(merged)
                merges.append(pair)
    vocab = {token: i for i, token in enumerate(tokens)}
    # Without model_max_length the pipeline pads prompts to ~1e30 tokens (see DESIGN.md).
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _tiny_text_config(vocab_size: int, **overrides) -> CLIPTextConfig:
    config = {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    config.update(overrides)
    return CLIPTextConfig(**config)


def build_tiny_stable_diffusion(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD-2-style pipeline (32 px, epsilon prediction, PNDM sampling) with random weights."""
    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # as in SD 2.x
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=TINY_IMAGE_SIZE,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(vocab_size=len(tokenizer)))
    # The scheduler config of stable-diffusion-2-1-base.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def save_tiny_stable_diffusion(path: str | os.PathLike, seed: int = 0) -> str:
    """Writes the tiny pipeline to `path` (safetensors) and returns the path."""
    build_tiny_stable_diffusion(seed).save_pretrained(path, safe_serialization=True)
    return str(path)


def _tiny_vae(seed: int, latent_channels: int = 4, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        sample_size=TINY_IMAGE_SIZE,
        **overrides,
    )


def build_tiny_stable_diffusion_xl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline (32 px, two CLIP text encoders, `text_time` micro-conditioning, Euler sampling) with random
    weights; the UNet is diffusers' own SDXL test configuration, the tokenizers are built locally."""
    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + the pooled text projection
        cross_attention_dim=64,  # both encoders' hidden states side by side
    )
    vae = _tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(vocab_size=len(tokenizer)))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(vocab_size=len(tokenizer)))
    # The scheduler config of stable-diffusion-xl-base-1.0.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_tiny_stable_diffusion_3(seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny SD 3.5-style pipeline (32 px, CLIP-L/G stand-ins, no T5, an MMDiT with one dual-attention block and
    RMS q/k norms, flow matching with SD3's shift 3) with random weights; the tokenizers are built locally."""
    tokenizer = build_tiny_clip_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # both encoders' hidden states side by side (T5's width in the real model)
        pooled_projection_dim=64,  # both encoders' projections side by side
        pos_embed_max_size=16,
        dual_attention_layers=(0,),  # SD 3.5's MMDiT-X block
        qk_norm="rms_norm",
    )
    # SD3's 16-channel VAE with its shift and scale.
    vae = _tiny_vae(seed, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                    use_post_quant_conv=False)  # fmt: skip
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_tiny_text_config(vocab_size=len(tokenizer)))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(vocab_size=len(tokenizer)))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # stable-diffusion-3-medium's
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


TINY_GENERATORS = {
    "sd": build_tiny_stable_diffusion,
    "sdxl": build_tiny_stable_diffusion_xl,
    "sd3": build_tiny_stable_diffusion_3,
}  # generator family name (`families`) -> its tiny pipeline


def save_tiny_generator(path: str | os.PathLike, family: str = "sd", seed: int = 0) -> str:
    """Writes the tiny pipeline of a generator family (`TINY_GENERATORS`) to `path` (safetensors); returns the path."""
    TINY_GENERATORS[family](seed).save_pretrained(path, safe_serialization=True)
    return str(path)


def build_tiny_clip(seed: int = 0, words: Sequence[str] = TINY_VOCAB_WORDS) -> tuple[CLIPModel, CLIPProcessor]:
    """A tiny `CLIPModel` (ViT, 32 px, patch 8) and its processor, random weights; `words` are the tokenizer's."""
    tokenizer = build_tiny_clip_tokenizer(words=words)
    text_config = _tiny_text_config(vocab_size=len(tokenizer))
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        projection_dim=32,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    # The PIL image processor: the torchvision backend is not installable beside the CPU torch used here.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_clip(path: str | os.PathLike, seed: int = 0) -> str:
    """Writes the tiny CLIP model and processor to `path` and returns the path."""
    model, processor = build_tiny_clip(seed)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return str(path)


def accelerate_launch_command(script: str | os.PathLike, num_processes: int = 2) -> list[str]:
    """`accelerate launch` argv that starts `num_processes` CPU processes (`--cpu` alone starts one, see DESIGN.md).

    The script must create its `Accelerator(cpu=not torch.cuda.is_available())` and call `end_training()`.
    """
    import sys

    if num_processes == 1:
        return [sys.executable, str(script)]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
    ]


def write_fake_stage1_output(
    path: str | os.PathLike,
    base_model_path: str,
    class_names: list[str],
    mode: str = "cls",
    seed: int = 0,
    images_per_class: int | Sequence[int] = 3,
    image_text_encoder: bool = False,
) -> str:
    """Writes a stage-1-style output folder (see the stage-1/stage-2 contract) with random, non-zero LoRA adapters.

    Lets stage-2 tests run without stage 1: adapters use `init=False` (B != 0) so they really change the outputs,
    and each class gets its own torch seed (`seed * 1000 + class index`) so class adapters differ. The `dset` adapter
    uses the seed of class 0, so it equals class 0's `cls` adapter under the same `seed` (tests rely on it).

    `mode="image"` writes LoFT's layout (`adapter_index.image_adapter_index`): `images_per_class` adapters per class
    (one count for all, or one per class), rank 2 (alpha 4), UNet only unless `image_text_encoder`, as if trained on
    the made-up dataset rows `100 * class + j`; adapter j of class c has torch seed `seed * 1000 + 100 * (c + 1) + j`.
    """
    import json

    from .adapter_index import adapter_index, image_adapter_index
    from .files import write_json_atomic
    from .lora import generator_lora_configs, save_generator_lora
    from .prompts import PromptTemplate
    from .run_folder import TRAINING_CONFIG_NAME
    from .versions import library_versions

    if mode not in ("dset", "cls", "image"):
        raise ValueError(f"`mode` must be 'dset', 'cls' or 'image', got {mode!r}.")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(base_model_path, safety_checker=None, use_safetensors=True)
    # Image mode: LoFT's rank 2, with alpha 4 so that a scale alpha / r != 1 is exercised.
    unet_config, text_config = generator_lora_configs(
        **({"rank": 2, "alpha": 4} if mode == "image" else {"rank": 4}), init=False
    )
    with_text = mode != "image" or image_text_encoder
    if mode == "image":
        counts = [images_per_class] * len(class_names) if isinstance(images_per_class, int) else images_per_class
        index = image_adapter_index(class_names, [[100 * c + j for j in range(n)] for c, n in enumerate(counts)])
        seeds = {
            key: seed * 1000 + 100 * (image["class"] + 1) + image["row"] % 100
            for key, image in index["images"].items()
        }
    else:
        index = adapter_index(mode, class_names)
        seeds = {key: seed * 1000 + (0 if key == "all" else int(key)) for key in index["adapters"]}
    for key, folder in index["adapters"].items():
        adapter_name = f"fake_{key}"
        torch.manual_seed(seeds[key])
        pipe.unet.add_adapter(unet_config, adapter_name=adapter_name)
        if with_text:
            pipe.text_encoder.add_adapter(text_config, adapter_name=adapter_name)
        os.makedirs(os.path.join(path, folder), exist_ok=True)
        text_encoder = pipe.text_encoder if with_text else None
        save_generator_lora(os.path.join(path, folder), pipe.unet, text_encoder, adapter_name=adapter_name)
        pipe.unet.delete_adapters(adapter_name)
        if with_text:
            pipe.text_encoder.delete_adapter(adapter_name)
    write_json_atomic(os.path.join(path, "adapter_index.json"), index)
    template = PromptTemplate(domain="")
    # The layout stage 1 writes (`adapt.outputs.run_record`), reduced to what stage 2 reads.
    config = {
        "stage": "datadream_lora",
        "base_model": {"pretrained_model_name_or_path": base_model_path, "revision": None, "variant": None},
        "mode": mode,
        "class_names": list(class_names),
        "few_shot": {"k": 4, "seed": seed, "fingerprint": "fake"},
        "prompt_template": template.to_dict(),
        "prompts": [template(name) for name in class_names],
        "lora": {"rank": unet_config.r, "alpha": unet_config.lora_alpha, "init": "random (test fake)"},
        "hparams": {"seed": seed},
        "library_versions": library_versions(),
    }
    write_json_atomic(os.path.join(path, TRAINING_CONFIG_NAME), config)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(f"# Fake stage-1 output for tests\n\n```json\n{json.dumps(config['lora'])}\n```\n")
    return path


def _metaspace_words(words: Sequence[str]) -> list[str]:
    return [f"\u2581{word}" for word in dict.fromkeys(words)]


def build_tiny_siglip_tokenizer(
    words: Sequence[str] = TINY_VOCAB_WORDS, model_max_length: int = 16, gemma: bool = False
):
    """A real `tokenizers`-backed tokenizer of SigLIP's kind, no download and no sentencepiece: a T5-style Unigram
    (SigLIP's tokenizer is T5's SentencePiece; like it, it gives the model `input_ids` only), or with `gemma` a
    byte-fallback BPE `GemmaTokenizer` (what the fixed-resolution SigLIP 2 checkpoints ship). `words` become whole
    tokens; anything else is spelled letter by letter."""
    from transformers import GemmaTokenizer, T5Tokenizer

    letters = sorted({c for word in words for c in word} | set("abcdefghijklmnopqrstuvwxyz"))
    if not gemma:
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
        vocab += [(word, -1.0) for word in _metaspace_words(words)] + [(c, -5.0) for c in letters]
        return T5Tokenizer(
            vocab=vocab, extra_ids=0, model_max_length=model_max_length, model_input_names=["input_ids"]
        )
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581", *letters]
    merges = []
    for word in _metaspace_words(words):
        merged = word[0]
        for piece in word[1:]:
            if merged + piece not in tokens:
                tokens.append(merged + piece)
                merges.append((merged, piece))
            merged = merged + piece
    vocab = {token: i for i, token in enumerate(tokens)}
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_tiny_siglip(seed: int = 0, gemma_tokenizer: bool = False, full_size: bool = False):
    """A `SiglipModel` with random weights and its processor: tiny (ViT, 32 px, patch 8, 16-token prompts), or with
    `full_size` shaped as google/siglip-base-patch16-224 (ViT-B/16, 224 px, 64-token prompts). `gemma_tokenizer`
    builds it as the fixed-resolution SigLIP 2 checkpoints are (a SiglipModel read with a Gemma tokenizer)."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    max_length = 64 if full_size else 16
    tokenizer = build_tiny_siglip_tokenizer(model_max_length=max_length, gemma=gemma_tokenizer)
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text_config = {"vocab_size": len(tokenizer), "max_position_embeddings": max_length, **({} if full_size else tiny)}
    eos = tokenizer.eos_token_id
    text_config.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id or eos)
    text_config["eos_token_id"] = eos
    vision_config = {"image_size": 224, "patch_size": 16} if full_size else {
        "image_size": TINY_IMAGE_SIZE, "patch_size": 8, **tiny}  # fmt: skip
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text_config, vision_config=vision_config))
    with torch.no_grad():  # the SigLIP paper's initial scale and bias (transformers' random init zeroes both)
        model.logit_scale.fill_(2.302585)  # log 10
        model.logit_bias.fill_(-10.0)
    side = vision_config["image_size"]
    image_processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    return model, SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_vit_classifier(seed: int = 0, num_labels: int = 3):
    """A tiny `ViTForImageClassification` (32 px, patch 8) with random weights and its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=TINY_IMAGE_SIZE, patch_size=8, num_labels=num_labels,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = ViTForImageClassification(config)
    return model, ViTImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})


def save_model_and_processor(path: str | os.PathLike, model, processor) -> str:
    """Writes a model (safetensors) and its processor to `path`, as a Hub checkpoint holds them; returns the path."""
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return str(path)
