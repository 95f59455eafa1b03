"""The primary UNet of HyperSpace, also used alone by the FS / FSNR / AS baselines."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from .layout import UNetLayout

__all__ = ["ConvBlock", "PlainUNet", "masked_instance_norm"]


def masked_instance_norm(
    y: torch.Tensor, mask: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """InstanceNorm of ``y`` ``(B, C, *spatial)`` over the voxels where ``mask`` ``(1, 1, *spatial)``
    is 1, with the padding (mask 0) zeroed afterwards; statistics in float32, as autocast runs
    InstanceNorm. PyTorch's InstanceNorm has no mask argument, hence this function."""
    dtype = y.dtype
    y = y.float()
    dims = [d for d in range(2, y.dim())]
    count = mask.sum()
    mean = (y * mask).sum(dims, keepdim=True) / count
    var = (((y - mean) * mask) ** 2).sum(dims, keepdim=True) / count
    y = (y - mean) * torch.rsqrt(var + eps)
    if weight is not None and bias is not None:
        shape = [1, -1] + [1] * len(dims)
        y = y * weight.view(shape) + bias.view(shape)
    return (y * mask).to(dtype)


class ConvBlock(nn.Sequential):
    """conv -> ReLU -> InstanceNorm(affine), the block of the HyperSpace UNet.

    ``block(x, mask=None)``: with a ``mask`` of the real voxels ``(1, 1, *spatial)`` (a zero-padded
    input), the norm's statistics are taken over the real voxels only and the padding is zeroed,
    so the real voxels get what the unpadded input would give them.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(
            Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
            nn.ReLU(inplace=True),
            Norm[Norm.INSTANCE, spatial_dims](out_channels, affine=True),
        )

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self[1](self[0](x))
        norm = self[2]
        if mask is None:
            return norm(y)
        return masked_instance_norm(y, mask, norm.weight, norm.bias, norm.eps)


class _UpLevel(nn.Module):
    """Transposed conv, crop to the skip connection, concatenate, then conv blocks."""

    def __init__(self, layout: UNetLayout, level: int):
        super().__init__()
        c_low, c = layout.channels[level + 1], layout.channels[level]
        k = layout.up_kernel_size
        self.up = Conv[Conv.CONVTRANS, layout.spatial_dims](c_low, c, k, stride=2, padding=(k - 2) // 2)
        blocks = [ConvBlock(layout.spatial_dims, 2 * c, c, layout.kernel_size)]
        blocks += [ConvBlock(layout.spatial_dims, c, c, layout.kernel_size) for _ in range(layout.convs_per_level[level] - 1)]
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.up(x)
        # a stride-2 conv maps n voxels to ceil(n / 2); upsampling gives 2 * ceil(n / 2) >= n, so
        # cropping to the skip's size supports any input size without padding the image
        for d in range(2, x.dim()):
            x = x.narrow(d, 0, skip.shape[d])
        if mask is not None:
            x = x * mask
        x = torch.cat([x, skip], dim=1)
        for block in self.convs:
            x = block(x, mask)
        return x


class PlainUNet(nn.Module):
    """The HyperSpace UNet with ordinary, trained (or generated) weights.

    Built from a :class:`~custom_networks.nets.layout.UNetLayout`; see there for the architecture. It is
    the network of the FS / FSNR / AS baselines and the module that
    :meth:`custom_networks.nets.hyperspace.HyperUNet.generate` returns. TorchScript-compatible.

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
        down = []
        for level, c in enumerate(layout.channels):
            c_in = layout.in_channels if level == 0 else layout.channels[level - 1]
            blocks = [ConvBlock(dims, c_in, c, k, stride=1 if level == 0 else 2)]
            blocks += [ConvBlock(dims, c, c, k) for _ in range(layout.convs_per_level[level])]
            down.append(nn.Sequential(*blocks))
        self.down = nn.ModuleList(down)
        self.up = nn.ModuleList([_UpLevel(layout, level) for level in reversed(range(layout.levels - 1))])
        self.head = Conv[Conv.CONV, dims](layout.channels[0], layout.out_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor, spacing: Optional[torch.Tensor] = None, masks: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Logits for ``x``.

        Args:
            x: ``(B, in_channels, *spatial)``.
            spacing: accepted and ignored, so that the baselines run in the same workflows
                (``prepare_batch``, inferers) that hand the spacing to a :class:`HyperUNet`.
            masks: for a zero-padded ``x`` (real voxels first on every axis, the padded size a
                multiple of ``layout.divisor``): one ``(1, 1, *spatial_l)`` mask of the real
                voxels per level (see ``custom_networks.pipeline.compiled.level_masks``). The
                norms then ignore the padding and the real voxels get the unpadded answer.
        """
        skips: List[torch.Tensor] = []
        for i, level in enumerate(self.down):
            mask = masks[i] if masks is not None else None
            for block in level:
                x = block(x, mask)
            skips.append(x)
        i = len(skips) - 2
        for level in self.up:
            x = level(x, skips[i], masks[i] if masks is not None else None)
            i -= 1
        return self.head(x)
