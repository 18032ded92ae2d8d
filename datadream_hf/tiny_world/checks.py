"""Sanity checks of the tiny world: does the generator know digits but not classes, can a LoRA teach it a class, and
does the CLIP backbone have features worth adapting? Used by `training_scripts/check_tiny_world.py`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from sklearn.linear_model import LogisticRegression
from transformers import CLIPModel, CLIPProcessor

from ..data import decode_images, labels_of
from ..lora import generator_lora_configs

logger = logging.getLogger(__name__)

PROBE_SIZE = 8  # sklearn's digits are 8x8 scans with 16 grey levels


def digit_probe_features(images: Sequence[Image.Image]) -> np.ndarray:
    """(N, 64) features on sklearn's digit scale: greyscale, box-downsampled to 8x8, ink 0..16."""
    pixels = [
        np.asarray(image.convert("L").resize((PROBE_SIZE, PROBE_SIZE), Image.BOX), np.float32) for image in images
    ]
    return np.stack(pixels).reshape(len(images), -1) * (16.0 / 255.0)


def fit_digit_probe(train_images: Sequence[Image.Image], train_labels: Sequence[int], seed: int = 0):
    """A logistic-regression digit classifier on real images: judges whether a generated image shows its class."""
    probe = LogisticRegression(max_iter=5000, random_state=seed)
    return probe.fit(digit_probe_features(train_images), np.asarray(train_labels))


def class_fidelity(probe, images: Sequence[Image.Image], labels: Sequence[int]) -> dict:
    """How often the probe reads the intended class, per class and overall, and how sure it is (a digit-likeness
    proxy: pure noise or blobs get low confidence)."""
    features = digit_probe_features(images)
    labels = np.asarray(labels)
    probabilities = probe.predict_proba(features)
    predicted = probe.classes_[probabilities.argmax(1)]
    per_class = {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}
    return {
        "accuracy": float((predicted == labels).mean()),
        "per_class_accuracy": per_class,
        "mean_confidence": float(probabilities.max(1).mean()),
        "predicted_histogram": np.bincount(predicted, minlength=len(probe.classes_)).tolist(),
    }


@torch.no_grad()
def sample_images(
    pipe: StableDiffusionPipeline,
    prompt: str,
    num_images: int,
    seed: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 2.0,
) -> list[Image.Image]:
    """`num_images` samples of `prompt` from one seeded generator (stage 2's defaults: 50 steps, guidance 2.0)."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        [prompt] * num_images,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
    ).images


def finetune_generator_lora(
    pipe: StableDiffusionPipeline,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    steps: int,
    learning_rate: float = 1e-4,
    batch_size: int = 8,
    rank: int = 16,
    warmup_steps: int = 100,
    seed: int = 0,
    unet_target_modules: Sequence[str] | None = None,
) -> list[float]:
    """A minimal DataDream stage 1 (reference recipe: LoRA on UNet attention + text encoder, epsilon MSE, AdamW
    wd 1e-2, cosine with warmup, grad clip 1.0), only to check that the tiny generator can learn a class from a few
    shots; the product's stage 1 is `training_scripts/train_datadream_lora.py`. Adds adapters to `pipe` in place and
    returns the loss curve. `unet_target_modules` overrides the reference's UNet targets (a diagnostic, e.g. adding the
    ResNet convolutions `conv1`, `conv2`)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    unet_config, text_config = generator_lora_configs(rank=rank)
    if unet_target_modules is not None:
        unet_config.target_modules = set(unet_target_modules)
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    params = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, steps), steps)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB"), np.float32) for image in images]))
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    ids = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    pipe.unet.train()
    pipe.text_encoder.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels[idx]).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        states = pipe.text_encoder(ids[idx])[0]
        pred = pipe.unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return losses


@torch.no_grad()
def clip_image_features(model: CLIPModel, processor: CLIPProcessor, images: Sequence[Image.Image]) -> np.ndarray:
    """L2-normalised projected image features (what the classifier head compares with text embeddings)."""
    features = []
    for start in range(0, len(images), 256):
        inputs = processor(images=list(images[start : start + 256]), return_tensors="pt")
        features.append(F.normalize(model.get_image_features(**inputs).pooler_output, dim=-1))
    return torch.cat(features).numpy()


@torch.no_grad()
def clip_prompt_head_accuracy(model, processor, images, labels, class_prompts: Sequence[str]) -> float:
    """Accuracy with class-prompt embeddings as the head: zero-shot (~chance) for a backbone that never saw labels, or
    after a LoRA fine-tune."""
    tokens = processor.tokenizer(list(class_prompts), padding=True, return_tensors="pt")
    text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1).numpy()
    predicted = (clip_image_features(model, processor, images) @ text.T).argmax(1)
    return float((predicted == np.asarray(labels)).mean())


def linear_probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Test accuracy of a logistic regression fit on frozen features."""
    probe = LogisticRegression(max_iter=5000, random_state=seed).fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def finetune_clip_lora(
    model: CLIPModel,
    processor: CLIPProcessor,
    images: Sequence[Image.Image],
    labels: Sequence[int],
    class_prompts: Sequence[str],
    steps: int,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """A minimal stage-3 classifier (reference placement: LoRA r=16, alpha 32 on q_proj/v_proj of both towers; head =
    class-prompt embeddings through the LoRA'd text tower; logits = frozen logit_scale x cosine), only to check that
    the backbone adapts; the product's classifier is `training_scripts/train_classifier.py`. Adds the adapter to
    `model` in place and returns the loss curve."""
    from ..lora import classifier_lora_config, lora_parameters
    from .world import clip_pixel_values, simclr_view

    torch.manual_seed(seed)
    model.requires_grad_(False)
    model.add_adapter(classifier_lora_config())
    params = list(lora_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.from_numpy(np.stack([np.asarray(image.convert("RGB"), np.float32) for image in images]))
    pixels = pixels.permute(0, 3, 1, 2) / 255.0  # (N, 3, H, W)
    targets = torch.as_tensor(np.asarray(labels))
    tokens = processor.tokenizer(list(class_prompts), padding=True, return_tensors="pt")
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        views = clip_pixel_values(simclr_view(pixels[idx], generator), processor)
        image = F.normalize(model.get_image_features(pixel_values=views).pooler_output, dim=-1)
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * image @ text.T, targets[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def split_images(dataset) -> tuple[list[Image.Image], np.ndarray]:
    return decode_images(dataset), labels_of(dataset)


def check_generator(
    generator_path, probe, class_names: Sequence[str], images_per_class: int = 50, seed: int = 0
) -> tuple[dict, list[list[Image.Image]]]:
    """Class fidelity of the frozen generator prompted with `a photo of a {class}`: ~chance if it does not know the
    classes, with high probe confidence if its samples look like digits. Returns the metrics and the samples."""
    pipe = StableDiffusionPipeline.from_pretrained(str(generator_path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    samples = [
        sample_images(pipe, f"a photo of a {name}", images_per_class, seed + c) for c, name in enumerate(class_names)
    ]
    labels = [c for c, row in enumerate(samples) for _ in row]
    metrics = class_fidelity(probe, [image for row in samples for image in row], labels)
    generic = sample_images(pipe, "a photo of a digit", images_per_class, seed + len(class_names))
    metrics["generic_prompt_mean_confidence"] = class_fidelity(probe, generic, [0] * len(generic))["mean_confidence"]
    return metrics, samples


def check_generator_lora(
    generator_path,
    probe,
    shots: Sequence[Image.Image],
    shot_labels: Sequence[int],
    class_names: Sequence[str],
    classes: Sequence[int],
    steps: int,
    learning_rate: float,
    images_per_class: int = 50,
    seed: int = 0,
    unet_target_modules: Sequence[str] | None = None,
) -> tuple[dict, list[list[Image.Image]]]:
    """Trains one LoRA on the few shots of `classes` (one class: cls mode; several, each with its own prompt: dset
    mode) and measures the class fidelity of samples of those classes' prompts. Returns the metrics and the samples."""
    pipe = StableDiffusionPipeline.from_pretrained(str(generator_path), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    chosen = [i for i, label in enumerate(shot_labels) if label in set(classes)]
    images = [shots[i] for i in chosen]
    prompts = [f"a photo of a {class_names[shot_labels[i]]}" for i in chosen]
    losses = finetune_generator_lora(
        pipe,
        images,
        prompts,
        steps=steps,
        learning_rate=learning_rate,
        seed=seed,
        unet_target_modules=unet_target_modules,
    )
    samples = [sample_images(pipe, f"a photo of a {class_names[c]}", images_per_class, seed + c) for c in classes]
    labels = [c for c, row in zip(classes, samples) for _ in row]
    metrics = class_fidelity(probe, [image for row in samples for image in row], labels)
    metrics |= {
        "classes": [class_names[c] for c in classes],
        "steps": steps,
        "learning_rate": learning_rate,
        "unet_target_modules": sorted(pipe.unet.peft_config["default"].target_modules),
        "first_loss": float(np.mean(losses[:20])),
        "last_loss": float(np.mean(losses[-20:])),
    }
    return metrics, samples


def check_clip(
    clip_path,
    shots,
    shot_labels,
    test_images,
    test_labels,
    class_names: Sequence[str],
    lora_steps: int = 1000,
    lora_learning_rate: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Test accuracies of the shipped CLIP and of the same architecture at random init: a linear probe on frozen image
    features fit on the K shots, zero-shot with class prompts, and a stage-3-style LoRA trained on the K shots
    (`lora_*`); plus a linear probe on raw 8x8 pixels for scale."""
    from ..testing import build_tiny_clip

    model, processor = (
        CLIPModel.from_pretrained(str(clip_path), use_safetensors=True).eval(),
        CLIPProcessor.from_pretrained(str(clip_path)),
    )
    random_model = build_tiny_clip(seed)[0].eval()
    prompts = [f"a photo of a {name}" for name in class_names]
    result = {}
    for name, m in (("pretrained", model), ("random_init", random_model)):
        train_x = clip_image_features(m, processor, shots)
        test_x = clip_image_features(m, processor, test_images)
        result[f"linear_probe_{name}"] = linear_probe_accuracy(train_x, shot_labels, test_x, test_labels, seed)
        result[f"zero_shot_{name}"] = clip_prompt_head_accuracy(m, processor, test_images, test_labels, prompts)
    for name, m in (("pretrained", model), ("random_init", random_model)):
        finetune_clip_lora(m, processor, shots, shot_labels, prompts, lora_steps, lora_learning_rate, seed=seed)
        result[f"lora_{name}"] = clip_prompt_head_accuracy(m, processor, test_images, test_labels, prompts)
    result |= {"lora_steps": lora_steps, "lora_learning_rate": lora_learning_rate}
    result["linear_probe_raw_pixels"] = linear_probe_accuracy(
        digit_probe_features(shots), shot_labels, digit_probe_features(test_images), test_labels, seed
    )
    return result


def checks_markdown(results: dict) -> str:
    """The check results as a short markdown summary (for the card and the console)."""
    frozen = results["frozen_generator"]
    frozen_per_class = {int(c): v for c, v in frozen["per_class_accuracy"].items()}  # JSON turns int keys to str
    lines = [
        f"- Probe (logistic regression on 8x8 greyscale, fit on the real train split): "
        f"{results['probe_real_test_accuracy']:.1%} on the real test split, mean confidence "
        f"{results['probe_real_test_confidence']:.2f}.",
        f"- Frozen generator, prompt `a photo of a {{digit}}`, {sum(frozen['predicted_histogram'])} images: the probe "
        f"reads the prompted class in **{frozen['accuracy']:.1%}** (chance 10%); mean probe confidence "
        f"{frozen['mean_confidence']:.2f} (prompt `a photo of a digit`: "
        f"{frozen['generic_prompt_mean_confidence']:.2f}); predicted-class histogram {frozen['predicted_histogram']}.",
        "",
        "| LoRA on the 16 shots of | UNet targets | steps | lr | loss first -> last | prompted-class accuracy, frozen "
        "-> LoRA |",
        "|---|---|---|---|---|---|",
    ]
    for run in results["lora"]:
        before = " / ".join(f"{frozen_per_class[c]:.0%}" for c in map(int, run["per_class_accuracy"]))
        after = " / ".join(f"{v:.0%}" for v in run["per_class_accuracy"].values())
        lines.append(
            f"| {', '.join(run['classes'])} | {', '.join(run['unet_target_modules'])} | {run['steps']} | "
            f"{run['learning_rate']:g} | {run['first_loss']:.3f} -> {run['last_loss']:.3f} | {before} -> {after} |"
        )
    clip = results["clip"]
    lines += [
        "",
        f"- CLIP, 16-shot linear probe on frozen image features, real test split: pretrained "
        f"**{clip['linear_probe_pretrained']:.1%}**, same architecture at random init "
        f"{clip['linear_probe_random_init']:.1%}, "
        f"raw 8x8 pixels {clip['linear_probe_raw_pixels']:.1%}; zero-shot with class prompts: pretrained "
        f"{clip['zero_shot_pretrained']:.1%}, random init {clip['zero_shot_random_init']:.1%} (chance 10%).",
        f"- CLIP + stage-3-style LoRA (r=16, alpha 32, q_proj/v_proj of both towers, class-prompt head, frozen logit "
        f"scale) trained {clip['lora_steps']} steps at lr {clip['lora_learning_rate']:g} on the 16 shots/class: test "
        f"accuracy pretrained **{clip['lora_pretrained']:.1%}**, random init {clip['lora_random_init']:.1%}.",
    ]
    return "\n".join(lines)
