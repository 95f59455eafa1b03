"""The primary UNet of HyperSpace, also used alone by the FS / FSNR / AS baselines."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .layout import UNetLayout

__all__ = ["ConvBlock", "PlainUNet"]


def _conv_types(spatial_dims: int):
    if spatial_dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d
    return nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d


class ConvBlock(nn.Sequential):
    """conv -> ReLU -> InstanceNorm(affine), the block of the HyperSpace UNet."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        conv, _, norm = _conv_types(spatial_dims)
        super().__init__(
            conv(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
            nn.ReLU(inplace=True),
            norm(out_channels, affine=True),
        )


class _UpLevel(nn.Module):
    """Transposed conv, crop to the skip connection, concatenate, then conv blocks."""

    def __init__(self, layout: UNetLayout, level: int):
        super().__init__()
        _, conv_t, _ = _conv_types(layout.spatial_dims)
        c_low, c = layout.channels[level + 1], layout.channels[level]
        k = layout.up_kernel_size
        self.up = conv_t(c_low, c, k, stride=2, padding=(k - 2) // 2)
        blocks = [ConvBlock(layout.spatial_dims, 2 * c, c, layout.kernel_size)]
        blocks += [ConvBlock(layout.spatial_dims, c, c, layout.kernel_size) for _ in range(layout.convs_per_level[level] - 1)]
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # a stride-2 conv maps n voxels to ceil(n / 2); upsampling gives 2 * ceil(n / 2) >= n, so
        # cropping to the skip's size supports any input size without padding the image
        for d in range(2, x.dim()):
            x = x.narrow(d, 0, skip.shape[d])
        return self.convs(torch.cat([x, skip], dim=1))


class PlainUNet(nn.Module):
    """The HyperSpace UNet with ordinary, trained (or generated) weights.

    Built from a :class:`~custom_networks.layout.UNetLayout`; see there for the architecture. It is
    the network of the FS / FSNR / AS baselines and the module that
    :meth:`custom_networks.hyperspace.HyperUNet.generate` returns. TorchScript-compatible.

    Args:
        spatial_dims, in_channels, out_channels, channels, convs_per_level, kernel_size,
        up_kernel_size: the fields of :class:`UNetLayout`.
        layout: a ready layout instead of the fields above.

    Shapes:
        input ``(B, in_channels, *spatial)``, any spatial size (sizes divisible by
        ``layout.divisor`` avoid cropping between levels); output ``(B, out_channels,
        *spatial)`` logits, same spatial size.

    Example::

        >>> net = PlainUNet(spatial_dims=3, in_channels=1, out_channels=2)
        >>> net(torch.zeros(1, 1, 40, 33, 17)).shape
        torch.Size([1, 2, 40, 33, 17])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        convs_per_level: int | Sequence[int] = 3,
        kernel_size: int = 3,
        up_kernel_size: int = 4,
        layout: UNetLayout | None = None,
    ):
        super().__init__()
        if layout is None:
            layout = UNetLayout(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=out_channels,
                channels=tuple(channels),
                convs_per_level=convs_per_level if isinstance(convs_per_level, int) else tuple(convs_per_level),
                kernel_size=kernel_size,
                up_kernel_size=up_kernel_size,
            )
        self.layout = layout
        dims, k = layout.spatial_dims, layout.kernel_size
        conv, _, _ = _conv_types(dims)
        down = []
        for level, c in enumerate(layout.channels):
            c_in = layout.in_channels if level == 0 else layout.channels[level - 1]
            blocks = [ConvBlock(dims, c_in, c, k, stride=1 if level == 0 else 2)]
            blocks += [ConvBlock(dims, c, c, k) for _ in range(layout.convs_per_level[level])]
            down.append(nn.Sequential(*blocks))
        self.down = nn.ModuleList(down)
        self.up = nn.ModuleList([_UpLevel(layout, level) for level in reversed(range(layout.levels - 1))])
        self.head = conv(layout.channels[0], layout.out_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor, spacing: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``spacing`` is accepted and ignored, so that the baselines run in the same workflows
        (``prepare_batch``, inferers) that hand the spacing to a :class:`HyperUNet`."""
        skips: List[torch.Tensor] = []
        for level in self.down:
            x = level(x)
            skips.append(x)
        i = len(skips) - 2
        for level in self.up:
            x = level(x, skips[i])
            i -= 1
        return self.head(x)
