"""Image grids for cards and reports (written with `files.save_png_atomic`)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


def image_grid(rows: Sequence[Sequence[Image.Image]], scale: int = 1, gap: int = 0) -> Image.Image:
    """Pastes rows of images into one white-backed image, each upscaled `scale` times (nearest neighbour) into a cell
    as large as the largest image, with `gap` pixels of white between the images of a row."""
    cell_w = max(image.width for row in rows for image in row) * scale
    cell_h = max(image.height for row in rows for image in row) * scale
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * (cell_w + gap) - gap, len(rows) * cell_h), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            scaled = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            grid.paste(scaled, (c * (cell_w + gap), r * cell_h))
    return grid


def chunk(images: Sequence[Image.Image], columns: int) -> list[list[Image.Image]]:
    """`images` as rows of `columns` (the last row may be shorter)."""
    return [list(images[i : i + columns]) for i in range(0, len(images), columns)]
