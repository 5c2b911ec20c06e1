"""The demo vision warm start's per-patch targets, against a pixel-level reading of the rendered scene."""

from __future__ import annotations

import numpy as np
import pytest

from vlmtrain.demo.scenes import COLORS, GRID, KINDS, SIZES, sample_scene
from vlmtrain.demo.warmstart import cell_targets


@pytest.mark.parametrize(("image_size", "patch"), [(48, 8), (48, 16), (96, 8)])
def test_every_patch_gets_its_cells_shape_and_index(image_size, patch):
    rng = np.random.default_rng(3)
    side = image_size // patch
    for _ in range(20):
        scene = sample_scene(rng)
        row = scene.to_json()
        targets = cell_targets(row, side)
        assert targets.shape == (side * side, 4)
        pixels = np.asarray(scene.render(image_size).convert("RGB"))
        for p in range(side * side):
            r, c = divmod(p, side)
            # The cell under the patch's center pixel: where the rendered shape of that cell is drawn.
            cy, cx = int((r + 0.5) * patch * GRID // image_size), int((c + 0.5) * patch * GRID // image_size)
            assert targets[p, 3] == cy * GRID + cx
            here = [o for o in row["objects"] if (o["y"], o["x"]) == (cy, cx)]
            if not here:
                assert targets[p, :3].tolist() == [0, 0, 0]
                continue
            (obj,) = here
            assert targets[p, :3].tolist() == [
                1 + list(COLORS).index(obj["color"]),
                1 + KINDS.index(obj["kind"]),
                1 + SIZES.index(obj["size"]),
            ]
            # and that cell of the image really holds a pixel of the shape's color
            y0, x0 = cy * image_size // GRID, cx * image_size // GRID
            cell = pixels[y0 : y0 + image_size // GRID, x0 : x0 + image_size // GRID].reshape(-1, 3)
            assert (cell == COLORS[obj["color"]]).all(axis=1).any()
