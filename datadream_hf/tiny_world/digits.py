"""Small real data, offline: scikit-learn's handwritten digits (1797 8x8 scans) as a `datasets.DatasetDict`."""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits_dataset(image_size: int = 32, test_fraction: float = 0.3, seed: int = 0) -> DatasetDict:
    """Returns `train`/`test` splits (stratified, seeded) with an RGB `image` and a `label` ClassLabel.

    The 8x8 scans (16 grey levels) are upscaled bicubically to `image_size` so the tiny models see a usual image.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), ink is bright
    indices = np.arange(len(pixels))
    train_idx, test_idx = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=digits.target)
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})

    def split(idx: np.ndarray) -> Dataset:
        images = [
            PILImage.fromarray(pixels[i]).resize((image_size, image_size), PILImage.BICUBIC).convert("RGB")
            for i in sorted(idx)
        ]
        labels = [int(digits.target[i]) for i in sorted(idx)]
        return Dataset.from_dict({"image": images, "label": labels}, features=features)

    return DatasetDict(train=split(train_idx), test=split(test_idx))
