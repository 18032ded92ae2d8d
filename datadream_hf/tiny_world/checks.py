"""Sanity checks of the tiny world: does the generator follow prompts about what it knows but not know which digit is
which, did no class label leak into pre-training, and does the CLIP backbone have features worth adapting? Used by
`training_scripts/check_tiny_world.py` and the demo's report."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from sklearn.linear_model import LogisticRegression
from transformers import CLIPModel, CLIPProcessor

from .captions import CAPTION_WORDS, COLUMN_WORDS, DigitDescription, describe_digit
from .digits import DIGIT_NAMES

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
    prompts: Sequence[str],
    seed: int,
    num_inference_steps: int = 25,
    guidance_scale: float = 2.0,
    batch_size: int = 50,
) -> list[Image.Image]:
    """One image per prompt, in batches, each batch from a generator seeded by (seed, batch start)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed * 100_000 + start)
        batch = list(prompts[start : start + batch_size])
        images += pipe(
            batch, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator
        ).images
    return images


def description_vector(description: DigitDescription) -> np.ndarray:
    """The ink grid (12 cells) and whether there is a loop, as 13 booleans."""
    cells = [word in row for row in description.ink for word in COLUMN_WORDS]
    return np.array([*cells, description.loops > 0], dtype=bool)


def check_prompt_following(pipe, probe, images: Sequence[Image.Image], labels: Sequence[int], seed: int = 0) -> dict:
    """Captions of real images as prompts: how often each sample's own description agrees with its prompt, cell by
    cell of the ink grid and for loops, against the same with the prompts shuffled (what ignoring the prompt scores);
    and how often the probe reads the sample as the digit of the image whose caption was the prompt. Returns the
    metrics and the samples."""
    descriptions = [describe_digit(image) for image in images]
    samples = sample_images(pipe, [d.caption() for d in descriptions], seed)
    wanted = np.stack([description_vector(d) for d in descriptions])  # (N, 13)
    got = np.stack([description_vector(describe_digit(image)) for image in samples])
    shuffled = got[np.random.default_rng(seed).permutation(len(got))]
    return {
        "num_prompts": len(images),
        "ink_cell_agreement": float((wanted[:, :-1] == got[:, :-1]).mean()),
        "ink_cell_agreement_shuffled": float((wanted[:, :-1] == shuffled[:, :-1]).mean()),
        "loop_agreement": float((wanted[:, -1] == got[:, -1]).mean()),
        "loop_agreement_shuffled": float((wanted[:, -1] == shuffled[:, -1]).mean()),
        "digit_of_captioned_image": class_fidelity(probe, samples, labels)["accuracy"],
    }, samples


def check_frozen_generator(pipe, probe, class_names: Sequence[str], images_per_class: int, seed: int = 0) -> dict:
    """Class fidelity of the frozen generator prompted with `a photo of a {class}`: ~chance when it does not know the
    class names, with high probe confidence when its samples look like digits. Returns the metrics and samples."""
    prompts = [f"a photo of a {name}" for name in class_names for _ in range(images_per_class)]
    samples = sample_images(pipe, prompts, seed)
    labels = [c for c in range(len(class_names)) for _ in range(images_per_class)]
    metrics = class_fidelity(probe, samples, labels)
    generic = sample_images(pipe, ["a photo of a digit"] * images_per_class, seed + 1)
    metrics["generic_prompt_mean_confidence"] = class_fidelity(probe, generic, [0] * len(generic))["mean_confidence"]
    rows = [samples[c * images_per_class : (c + 1) * images_per_class] for c in range(len(class_names))]
    return metrics, rows


def check_no_label_leak(descriptions: Sequence[DigitDescription]) -> dict:
    """No digit name is a caption word nor appears in any pre-training caption (captions come from `describe_digit`,
    which reads pixels only)."""
    leaked_words = sorted(set(CAPTION_WORDS) & set(DIGIT_NAMES))
    captions = [d.caption() for d in descriptions]
    leaked = [c for c in captions if set(c.replace(",", " ").split()) & set(DIGIT_NAMES)]
    return {"digit_names_in_caption_words": leaked_words, "captions_naming_a_digit": len(leaked)}


def caption_informativeness(train_images, train_labels, test_images, test_labels, seed: int = 0) -> dict[str, float]:
    """How much the captions say about the class: a logistic regression from caption words (and word pairs) to the
    label, fit on the real train split, scored on test. High means the language can describe each digit (as SD's can
    describe an aircraft); it is measured here with labels, which pre-training never sees."""
    from sklearn.feature_extraction.text import CountVectorizer

    train = [describe_digit(image).caption() for image in train_images]
    test = [describe_digit(image).caption() for image in test_images]
    vectorizer = CountVectorizer(ngram_range=(1, 2)).fit(train)
    model = LogisticRegression(max_iter=5000, random_state=seed).fit(vectorizer.transform(train), train_labels)
    return {"caption_to_label_accuracy": float(model.score(vectorizer.transform(test), test_labels))}


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
    """Accuracy with class-prompt embeddings as the head: zero-shot (~chance for a backbone that never heard the class
    names)."""
    tokens = processor.tokenizer(list(class_prompts), padding=True, return_tensors="pt")
    text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1).numpy()
    predicted = (clip_image_features(model, processor, images) @ text.T).argmax(1)
    return float((predicted == np.asarray(labels)).mean())


def linear_probe_accuracy(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Test accuracy of a logistic regression fit on frozen features."""
    probe = LogisticRegression(max_iter=5000, random_state=seed).fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def check_clip(clip_path, shots, shot_labels, test_images, test_labels, class_names, seed: int = 0) -> dict:
    """16-shot linear probe on the frozen image features of the shipped CLIP and of the same architecture at random
    init, zero-shot with class prompts (chance: the class names were never heard), and raw 8x8 pixels for scale."""
    from .world import build_tiny_world_clip

    model = CLIPModel.from_pretrained(str(clip_path), use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(str(clip_path))
    random_model = build_tiny_world_clip(seed)[0].eval()
    prompts = [f"a photo of a {name}" for name in class_names]
    result = {}
    for name, m in (("pretrained", model), ("random_init", random_model)):
        train_x = clip_image_features(m, processor, shots)
        test_x = clip_image_features(m, processor, test_images)
        result[f"linear_probe_{name}"] = linear_probe_accuracy(train_x, shot_labels, test_x, test_labels, seed)
        result[f"zero_shot_{name}"] = clip_prompt_head_accuracy(m, processor, test_images, test_labels, prompts)
    result["linear_probe_raw_pixels"] = linear_probe_accuracy(
        digit_probe_features(shots), shot_labels, digit_probe_features(test_images), test_labels, seed
    )
    return result


def checks_markdown(results: dict) -> str:
    """The check results as a short markdown summary (for the card and the console)."""
    frozen, following, clip = results["frozen_generator"], results["prompt_following"], results["clip"]
    leak, informative = results["label_leak"], results["captions"]
    return "\n".join(
        [
            f"- Probe (logistic regression on 8x8 greyscale, fit on the real train split): "
            f"{results['probe_real_test_accuracy']:.1%} on the real test split.",
            f"- Prompt following: {following['num_prompts']} captions of real test images as prompts; the samples' "
            f"own descriptions agree with the prompt on {following['ink_cell_agreement']:.1%} of the ink-grid cells "
            f"(prompts shuffled: {following['ink_cell_agreement_shuffled']:.1%}) and on loops in "
            f"{following['loop_agreement']:.1%} (shuffled: {following['loop_agreement_shuffled']:.1%}); the probe "
            f"reads {following['digit_of_captioned_image']:.1%} of the samples as the digit whose caption was the "
            f"prompt (the captions alone name the digit {informative['caption_to_label_accuracy']:.1%} of the time "
            "through a classifier fit on labelled captions).",
            f"- Frozen generator, prompt `a photo of a {{digit}}`, {sum(frozen['predicted_histogram'])} images: the "
            f"probe reads the prompted class in **{frozen['accuracy']:.1%}** (chance 10%); predicted-class histogram "
            f"{frozen['predicted_histogram']}; mean probe confidence {frozen['mean_confidence']:.2f} (prompt "
            f"`a photo of a digit`: {frozen['generic_prompt_mean_confidence']:.2f}).",
            f"- No label in pre-training: digit names among the caption words: {leak['digit_names_in_caption_words']}"
            f"; pre-training captions naming a digit: {leak['captions_naming_a_digit']}.",
            f"- CLIP, 16-shot linear probe on frozen image features, real test split: pretrained "
            f"**{clip['linear_probe_pretrained']:.1%}**, same architecture at random init "
            f"{clip['linear_probe_random_init']:.1%}, raw 8x8 pixels {clip['linear_probe_raw_pixels']:.1%}; zero-shot "
            f"with class prompts: pretrained {clip['zero_shot_pretrained']:.1%} (chance 10%).",
        ]
    )
