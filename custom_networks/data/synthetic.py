"""Generated volumes where the right label depends on size in millimetres.

Balls of two physical radii are rendered at any voxel spacing; only the large ones are
foreground. A ball of radius ``2 r`` mm at 2 mm spacing looks voxel for voxel like a ball of
radius ``r`` at 1 mm, so a network that ignores the spacing cannot label both correctly; a
spacing-conditioned one can. Used by the tests, the benchmarks and the README's built-in default.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

__all__ = [
    "SMALL_RADIUS_MM",
    "LARGE_RADIUS_MM",
    "render_balls",
    "ball_patch",
    "write_size_task_dataset",
    "write_click_task_dataset",
]

SMALL_RADIUS_MM = 2.5  # background balls
LARGE_RADIUS_MM = 5.0  # foreground balls (label 1)
DEFAULT_SPACINGS = ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5), (2.0, 2.0, 2.0), (1.0, 1.0, 2.0), (2.5, 2.5, 2.5), (1.2, 1.2, 1.2))  # mm


def render_balls(
    shape: Sequence[int],
    spacing: Sequence[float],
    centers_mm: np.ndarray,
    radii_mm: Sequence[float],
    labels: Sequence[int],
    rng: np.random.RandomState,
    noise: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Render balls into a ``(1, *shape)`` image and label at ``spacing`` mm.

    Voxel ``i`` sits at ``i * spacing`` mm. Intensity is the partial-volume fraction of a voxel
    inside a ball (a linear ramp one voxel wide), plus Gaussian noise; the label holds
    ``labels[k]`` where the voxel centre lies inside ball ``k``.
    """
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    image = np.zeros(tuple(shape), np.float32)
    label = np.zeros(tuple(shape), np.uint8)
    edge = float(np.mean(spacing))
    for center, radius, value in zip(np.asarray(centers_mm, np.float32), radii_mm, labels):
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center)))
        image = np.maximum(image, np.clip((radius - dist) / edge + 0.5, 0.0, 1.0))
        label[dist < radius] = value
    image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    return image[None], label[None]


def ball_patch(spacing: Sequence[float], patch_size: Sequence[int], large: bool, rng: np.random.RandomState):
    """One patch of ``patch_size`` voxels at ``spacing`` mm holding a single ball near its centre.

    Returns ``(image, label)`` of shape ``(1, *patch_size)``; the label is 1 inside a large ball.
    """
    spacing = np.asarray(spacing, np.float32)
    extent = (np.asarray(patch_size) - 1) * spacing
    center = extent / 2 + rng.uniform(-0.2, 0.2, len(patch_size)) * extent
    radius = LARGE_RADIUS_MM if large else SMALL_RADIUS_MM
    return render_balls(patch_size, spacing, center[None], [radius], [int(large)], rng)


def write_size_task_dataset(
    out_dir: str,
    spacings: Sequence[Sequence[float]] = DEFAULT_SPACINGS,
    extent_mm: float = 48.0,
    balls_per_kind: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Write NIfTI images and labels of the size task, one volume per native spacing.

    Each volume covers ``extent_mm`` per axis and holds ``balls_per_kind`` large (label 1) and
    small (label 0) balls that do not overlap. Files: ``<out_dir>/case_XX_image.nii.gz`` and
    ``_label.nii.gz``, with the spacing in the affine and a non-zero origin.

    Returns:
        a MONAI data list ``[{"image": path, "label": path}, ...]``.
    """
    return _write_balls_dataset(out_dir, spacings, extent_mm, balls_per_kind, seed, same_size=False)


def write_click_task_dataset(
    out_dir: str,
    spacings: Sequence[Sequence[float]] = DEFAULT_SPACINGS,
    extent_mm: float = 48.0,
    balls_per_kind: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Like :func:`write_size_task_dataset`, but every ball has radius ``LARGE_RADIUS_MM``.

    Which ``balls_per_kind`` balls are foreground is random: nothing in the image tells, only a
    user's clicks can. The task of the click-guided model's tests.
    """
    return _write_balls_dataset(out_dir, spacings, extent_mm, balls_per_kind, seed, same_size=True)


def _write_balls_dataset(out_dir, spacings, extent_mm, balls_per_kind, seed, same_size: bool) -> list[dict]:
    import nibabel as nib

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.RandomState(seed)
    items = []
    for i, spacing in enumerate(spacings):
        spacing = np.asarray(spacing, float)
        shape = np.round(extent_mm / spacing).astype(int)
        centers: list[np.ndarray] = []
        radii = [LARGE_RADIUS_MM] * balls_per_kind + [SMALL_RADIUS_MM if not same_size else LARGE_RADIUS_MM] * balls_per_kind
        for r in radii:
            for _ in range(1000):
                c = rng.uniform(r + 2, extent_mm - r - 2, 3)
                if all(np.linalg.norm(c - o) > r + ro + 2 for o, ro in zip(centers, radii)):
                    centers.append(c)
                    break
            else:
                raise RuntimeError(f"cannot place {len(radii)} balls in {extent_mm} mm; lower balls_per_kind.")
        labels = [1] * balls_per_kind + [0] * balls_per_kind
        image, label = render_balls(shape, spacing, np.stack(centers), radii, labels, rng)
        affine = np.diag(list(spacing) + [1.0])
        affine[:3, 3] = (-20.0 + i, 10.0, -5.0 * i)
        paths = {}
        for key, array, dtype in (("image", image[0] * 100.0 + 50.0, np.float32), ("label", label[0], np.uint8)):
            path = os.path.join(out_dir, f"case_{i:02d}_{key}.nii.gz")
            nib.save(nib.Nifti1Image(array.astype(dtype), affine), path)
            paths[key] = path
        items.append(paths)
    return items
