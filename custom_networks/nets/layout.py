"""The one description of the UNet that every model in this project is built from.

:class:`UNetLayout` is read by :class:`~custom_networks.nets.unet.PlainUNet` to build its layers, and
:class:`~custom_networks.nets.hyperspace.HyperUNet` builds its per-layer hypernetwork heads from the
parameters of a ``PlainUNet`` made from the same layout. The plain baselines (FS, FSNR, AS) and
HyperSpace therefore cannot disagree about the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["UNetLayout"]


def _as_tuple(value: int | Sequence[int], length: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * length
    value = tuple(int(v) for v in value)
    if len(value) != length:
        raise ValueError(f"{name} must have one entry per level ({length}), got {value}.")
    return value


@dataclass(frozen=True)
class UNetLayout:
    """Channels, convolutions and kernel sizes of the HyperSpace UNet.

    The architecture follows the HyperSpace paper (Joutard et al., MICCAI 2024) and its released
    code: level 0 starts with a ``kernel_size`` convolution ``in_channels -> channels[0]``, every
    deeper level with a stride-2 ``kernel_size`` convolution ``channels[l-1] -> channels[l]``; each
    of these entry convolutions is followed by ``convs_per_level[l]`` more convolutions. The
    decoder upsamples with a transposed convolution (kernel ``up_kernel_size``, stride 2,
    padding ``(up_kernel_size - 2) // 2``), concatenates the skip connection and applies
    ``convs_per_level[l]`` convolutions, the first ``2 * channels[l] -> channels[l]``. Every
    convolution except the transposed ones and the head is a block conv -> ReLU ->
    InstanceNorm(affine). The head is a ``kernel_size`` convolution ``channels[0] ->
    out_channels`` without activation (logits).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes, background included.
        channels: feature channels per level; ``len(channels) - 1`` downsamplings.
        convs_per_level: convolutions after each level's entry convolution, one int for all levels
            or one per level.
        kernel_size: odd kernel size of the ordinary convolutions.
        up_kernel_size: even kernel size of the transposed convolutions.

    Example::

        >>> layout = UNetLayout(spatial_dims=3, in_channels=1, out_channels=2)
        >>> layout.channels, layout.convs_per_level
        ((16, 32, 64, 128), (3, 3, 3, 3))
    """

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 128)
    convs_per_level: tuple[int, ...] | int = 3
    kernel_size: int = 3
    up_kernel_size: int = 4
    _levels: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}.")
        for name in ("in_channels", "out_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        channels = tuple(int(c) for c in self.channels)
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {self.channels!r}.")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size!r}.")
        if self.up_kernel_size < 2 or self.up_kernel_size % 2 == 1:
            raise ValueError(f"up_kernel_size must be even and >= 2, got {self.up_kernel_size!r}.")
        convs = _as_tuple(self.convs_per_level, len(channels), "convs_per_level")
        if min(convs) < 1:
            raise ValueError(f"convs_per_level must be >= 1 at every level, got {convs}.")
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "convs_per_level", convs)
        object.__setattr__(self, "_levels", len(channels))

    @property
    def levels(self) -> int:
        """Number of resolution levels (downsamplings + 1)."""
        return self._levels

    @property
    def divisor(self) -> int:
        """Input sizes that are multiples of this need no cropping between levels."""
        return 2 ** (self._levels - 1)

    def as_kwargs(self) -> dict:
        """Constructor arguments, e.g. for a bundle config or a checkpoint."""
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "convs_per_level": list(self.convs_per_level),
            "kernel_size": self.kernel_size,
            "up_kernel_size": self.up_kernel_size,
        }
