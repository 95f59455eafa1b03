"""Native-resolution labels from coarse features: an occupancy decoder in millimetres (after OSS-Net).

OSS-Net (Reich et al., BMVC 2021, arXiv:2110.10640) predicts a label at any continuous point from
a latent code of a downscaled volume and a small patch of the full-resolution image around the
point. Here the encoder is the project's (HyperSpace) UNet run at a coarse *working* spacing, and
every coordinate is physical:

- a query is a world coordinate (mm) from the image affine, not a voxel index;
- it reads the encoder's features at that point (trilinear, on the working grid), the position of
  the point inside its working cell, and a patch of ``patch_size**3`` samples ``patch_step_mm``
  apart along the image axes (a fixed physical extent at any native spacing), gathered with
  ``grid_sample`` on the device;
- a stack of residual blocks with conditional batch norm (OSS-Net's configuration C) maps that to
  class logits, conditioned on a latent code: the encoder features pooled over the volume and the
  log working spacing.

The encoder's first ``out_channels`` output channels are its own coarse prediction (the auxiliary
loss, and nothing else); the next ``features`` channels are what the decoder reads. Its weights
come from the hypernetwork at the working spacing, so one model encodes at any spacing of its range.

Why not MONAI: MONAI has no occupancy decoder, no conditional batch norm and no Padé activation.

Units: world coordinates in mm (the affine's frame, RAS for images MONAI oriented to RAS); voxel
indices in tensor axis order; images channel-first.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .build import build_network

__all__ = [
    "ConditionalBatchNorm1d",
    "OccupancyDecoder",
    "OccupancyNetwork",
    "PadeActivation",
    "ResidualCBNBlock",
    "grid_points",
    "index_to_world",
    "sample_at_points",
    "world_to_index",
]

# Padé coefficients: numerator a0..a5, denominator b1..b4 of
# (a0 + a1 x + ... + a5 x^5) / (1 + |b1 x| + ... + |b4 x^4|), a least-squares fit to LeakyReLU(0.01)
# on [-3, 3] (largest error 0.03), the shape OSS-Net starts its activations from
_PADE_LEAKY_RELU = (
    (0.029804, 0.61838, 2.32227, 3.04912, 1.483334, 0.25055),
    (1.141477, 4.389065, 0.870271, 0.346536),
)


class PadeActivation(nn.Module):
    """Padé activation unit (safe form): ``P(x) / (1 + sum_k |b_k| |x|^k)``, 10 learnable scalars.

    Pure PyTorch (the original needs a compiled CUDA kernel). Initialised to approximate a leaky
    ReLU, as OSS-Net does. Shapes: any; elementwise.
    """

    def __init__(self):
        super().__init__()
        num, den = _PADE_LEAKY_RELU
        self.numerator = nn.Parameter(torch.tensor(num, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(den, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.numerator.to(x.dtype), self.denominator.to(x.dtype)
        p = a[5]
        for k in range(4, -1, -1):  # Horner
            p = p * x + a[k]
        ax = x.abs()
        q = b[3].abs()
        for k in range(2, -1, -1):
            q = q * ax + b[k].abs()
        return p / (1.0 + q * ax)


def _activation(name: str) -> nn.Module:
    key = str(name).lower()
    if key == "pade":
        return PadeActivation()
    table = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU}
    if key not in table:
        raise ValueError(f"activation {name!r} is not one of pade, {', '.join(table)}.")
    return table[key]()


class ConditionalBatchNorm1d(nn.Module):
    """Batch norm over queries whose scale and shift are predicted from a latent code.

    ``x`` ``(B, N, F)`` (``N`` queries of ``B`` volumes), ``z`` ``(B, L)``: normalised with
    statistics over all ``B * N`` queries per feature (OSS-Net shares one mean and variance across
    the features as well), then ``gamma(z) * x + beta(z)`` per volume. ``gamma`` and ``beta`` are
    linear maps initialised to 1 and 0, so a fresh block is a plain batch norm.
    """

    def __init__(self, features: int, latent: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(features, affine=False)
        self.gamma = nn.Linear(latent, features)
        self.beta = nn.Linear(latent, features)
        for lin, bias in ((self.gamma, 1.0), (self.beta, 0.0)):
            nn.init.zeros_(lin.weight)
            nn.init.constant_(lin.bias, bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, n, f = x.shape
        y = self.norm(x.reshape(b * n, f)).reshape(b, n, f)
        return self.gamma(z)[:, None] * y + self.beta(z)[:, None]


class ResidualCBNBlock(nn.Module):
    """Linear -> CBN -> act -> Linear -> CBN, plus the input (projected if widths differ), -> act."""

    def __init__(self, in_features: int, features: int, latent: int, activation: str = "relu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_features, features), nn.Linear(features, features)
        self.cbn1, self.cbn2 = ConditionalBatchNorm1d(features, latent), ConditionalBatchNorm1d(features, latent)
        self.act1, self.act2 = _activation(activation), _activation(activation)
        self.skip = nn.Identity() if in_features == features else nn.Linear(in_features, features, bias=False)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.cbn2(self.fc2(self.act1(self.cbn1(self.fc1(x), z))), z)
        return self.act2(y + self.skip(x))


class OccupancyDecoder(nn.Module):
    """Per-query class logits from per-query features and a per-volume latent code.

    Shapes: ``x`` ``(B, N, in_features)``, ``z`` ``(B, latent)`` -> ``(B, out_channels, N)``
    logits (the channel-first layout of MONAI's losses, the queries as one spatial axis).
    """

    def __init__(self, in_features: int, latent: int, out_channels: int, width: int = 256, blocks: int = 5, activation: str = "relu"):
        super().__init__()
        if blocks < 1 or width < 1:
            raise ValueError(f"blocks and width must be >= 1, got {blocks} and {width}.")
        self.blocks = nn.ModuleList(
            [ResidualCBNBlock(in_features if i == 0 else width, width, latent, activation) for i in range(blocks)]
        )
        self.head = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, z)
        return self.head(x).transpose(1, 2)


def world_to_index(points: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """World coordinates (mm) ``(N, D)`` to voxel indices ``(N, D)`` of the grid with ``affine``
    ``(D + 1, D + 1)`` (index -> world, MONAI's convention). Computed in float64."""
    affine = torch.as_tensor(affine, dtype=torch.float64, device=points.device)
    inv = torch.linalg.inv(affine)
    return points.to(torch.float64) @ inv[:-1, :-1].T + inv[:-1, -1]


def index_to_world(index: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Voxel indices ``(N, D)`` of the grid with ``affine`` to world coordinates (mm), float64."""
    affine = torch.as_tensor(affine, dtype=torch.float64, device=index.device)
    return index.to(torch.float64) @ affine[:-1, :-1].T + affine[:-1, -1]


def grid_points(shape: Sequence[int], affine: torch.Tensor, stride: int = 1, device=None) -> torch.Tensor:
    """World coordinates (mm) of the voxel centres ``0, stride, 2 * stride, ...`` of a grid:
    ``(N, D)`` float64, C order over the strided grid (the last axis fastest)."""
    axes = [torch.arange(0, int(n), int(stride), dtype=torch.float64, device=device) for n in shape]
    return index_to_world(torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape)), affine)


def _normalised(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices ``(..., D)`` to ``grid_sample``'s ``[-1, 1]`` (``align_corners=True``), the
    axes reversed (``grid_sample`` reads x = the last tensor axis first)."""
    size = torch.tensor([2.0 / max(int(n) - 1, 1) for n in shape], dtype=index.dtype, device=index.device)
    return (index * size - 1.0).flip(-1)


def sample_at_points(image: torch.Tensor, index: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Trilinear samples of ``image`` ``(C, *spatial)`` at voxel indices ``index`` ``(..., D)``
    (fractional, tensor axis order) -> ``(..., C)`` float32. ``padding``: ``grid_sample``'s
    ``padding_mode`` outside the grid."""
    dims = image.dim() - 1
    lead = index.shape[:-1]
    grid = _normalised(index.reshape(-1, dims).to(torch.float32), image.shape[1:])
    grid = grid.reshape((1, -1) + (1,) * (dims - 1) + (dims,))
    out = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode=padding, align_corners=True)
    return out.reshape(image.shape[0], -1).T.reshape(*lead, image.shape[0])


class OccupancyNetwork(nn.Module):
    """An encoder at a working spacing and an occupancy decoder queried in world coordinates.

    Args:
        in_channels: image channels.
        out_channels: classes, background included.
        channels: the encoder UNet's channels per level.
        convs_per_level: the encoder UNet's convolutions per level (see ``UNetLayout``).
        features: encoder feature channels read by the decoder at each query.
        hypernetwork: the encoder's weights are generated from the working spacing (HyperSpace);
            ``False``: a plain UNet encoder trained at whatever spacing it is given.
        primary: the encoder's primary network (``"unet"`` or ``"sdn_unet"``).
        hidden_features: the hypernetwork's spacing MLP.
        patch_size: samples per axis of the local native-resolution patch (odd).
        patch_step_mm: distance between the patch's samples (mm).
        width, blocks, activation: the decoder (OSS-Net C: 512, 5, ``"pade"``).

    Use :meth:`encode` once per volume, then :meth:`decode` for any number of query chunks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        convs_per_level: int | Sequence[int] = 3,
        features: int = 16,
        hypernetwork: bool = True,
        primary: str = "unet",
        hidden_features: Sequence[int] = (10, 10, 50),
        patch_size: int = 7,
        patch_step_mm: float = 1.0,
        width: int = 256,
        blocks: int = 5,
        activation: str = "relu",
        spatial_dims: int = 3,
    ):
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and positive, got {patch_size!r}.")
        if not patch_step_mm > 0:
            raise ValueError(f"patch_step_mm must be > 0 (mm), got {patch_step_mm!r}.")
        self.spatial_dims, self.in_channels, self.out_channels, self.features = spatial_dims, in_channels, out_channels, features
        self.patch_size, self.patch_step_mm = int(patch_size), float(patch_step_mm)
        hyper = dict(hidden_features=tuple(hidden_features)) if hypernetwork else {}
        # the default depth is the paper's HyperUNet; another one builds the same network generically
        layout = None if convs_per_level == 3 else {"convs_per_level": convs_per_level}
        self.encoder = build_network(
            primary, hypernetwork, spatial_dims=spatial_dims, in_channels=in_channels,
            out_channels=out_channels + features, channels=tuple(channels), primary_kwargs=layout, **hyper,
        )
        self.latent_features = 2 * features + spatial_dims
        per_query = features + spatial_dims + in_channels * self.patch_size**spatial_dims
        self.decoder = OccupancyDecoder(per_query, self.latent_features, out_channels, width, blocks, activation)
        r = self.patch_size // 2
        offsets = torch.stack(
            torch.meshgrid(*[torch.arange(-r, r + 1, dtype=torch.float64)] * spatial_dims, indexing="ij"), dim=-1
        ).reshape(-1, spatial_dims)
        self.register_buffer("patch_offsets", offsets * self.patch_step_mm, persistent=False)  # (P, D) mm

    def encode(self, image: torch.Tensor, spacing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the encoder on one volume at its working spacing.

        Args:
            image: ``(C, *working)`` the image resampled to the working spacing.
            spacing: ``(D,)`` the working spacing (mm).

        Returns:
            ``coarse`` ``(out_channels, *working)`` logits (the auxiliary prediction),
            ``features`` ``(features, *working)``, ``latent`` ``(latent_features,)``.
        """
        spacing = torch.as_tensor(spacing, dtype=torch.float32, device=image.device).reshape(1, -1)
        out = self.encoder(image[None].float(), spacing)[0]
        coarse, feats = out[: self.out_channels], out[self.out_channels :]
        flat = feats.reshape(self.features, -1)
        latent = torch.cat([flat.mean(1), flat.amax(1), spacing[0].log()])
        return coarse, feats, latent

    def query_features(
        self,
        points: torch.Tensor,
        features: torch.Tensor,
        working_affine: torch.Tensor,
        image: torch.Tensor,
        native_affine: torch.Tensor,
    ) -> torch.Tensor:
        """Per-query decoder input ``(N, per_query)`` for world points ``(N, D)`` (mm) of one volume.

        ``features`` ``(F, *working)`` on the grid of ``working_affine``; ``image`` ``(C, *native)``
        (z-scored) on the grid of ``native_affine``. The patch steps along the native image axes,
        ``patch_step_mm`` apart in physical distance.
        """
        w_index = world_to_index(points, working_affine)
        enc = sample_at_points(features, w_index)
        cell = (w_index - w_index.round()).to(torch.float32)
        native_affine = torch.as_tensor(native_affine, dtype=torch.float64, device=points.device)
        voxel_mm = native_affine[:-1, :-1].norm(dim=0)  # native spacing per axis (mm)
        # float32 from here: indices below 2**14 keep 1e-3 voxel precision
        n_index = world_to_index(points, native_affine).to(torch.float32)
        step = (self.patch_offsets.to(points.device) / voxel_mm).to(torch.float32)
        patch_index = n_index[:, None, :] + step
        patch = sample_at_points(image, patch_index, padding="zeros")  # (N, P, C)
        return torch.cat([enc, cell, patch.reshape(points.shape[0], -1)], dim=1)

    def decode(self, query: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, out_channels, N)`` for per-query inputs ``(B, N, per_query)`` and latents ``(B, L)``."""
        return self.decoder(query, latent)

    def extra_repr(self) -> str:
        return f"features={self.features}, patch={self.patch_size}^{self.spatial_dims} x {self.patch_step_mm} mm"

