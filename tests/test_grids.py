"""Image grids: layout, scaling, padding of unequal images, atomic PNG writes."""

from PIL import Image

from datadream_hf.files import save_png_atomic
from datadream_hf.grids import chunk, image_grid


def test_grid_places_scales_and_pads():
    red, blue, wide = (
        Image.new("RGB", (2, 3), "red"),
        Image.new("RGB", (2, 3), "blue"),
        Image.new("RGB", (4, 3), "green"),
    )
    grid = image_grid([[red, blue], [blue]], scale=2)
    assert grid.size == (8, 12)
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((4, 0)) == (0, 0, 255)
    assert grid.getpixel((4, 6)) == (255, 255, 255)  # the short second row is padded white
    padded = image_grid([[red, wide]], gap=1)
    assert padded.size == (4 + 1 + 4, 3) and padded.getpixel((2, 0)) == (
        255,
        255,
        255,
    )  # red cell padded, not stretched
    assert [len(row) for row in chunk([red] * 5, 2)] == [2, 2, 1]


def test_png_written_atomically(tmp_path):
    path = save_png_atomic(Image.new("RGB", (2, 2)), tmp_path / "g.png")
    assert Image.open(path).size == (2, 2) and [p.name for p in tmp_path.iterdir()] == ["g.png"]
