"""HyperSpace: a hypernetwork that turns a voxel spacing into all weights of a UNet."""

from __future__ import annotations

from typing import Sequence

from .hypernetwork import HyperNetwork
from .layout import UNetLayout
from .unet import PlainUNet

__all__ = ["HyperUNet"]


class HyperUNet(HyperNetwork):
    """Spacing-conditioned UNet (Joutard et al., "HyperSpace", MICCAI 2024, arXiv:2407.03681).

    The paper's network: a :class:`~custom_networks.nets.hypernetwork.HyperNetwork` that generates
    all weights of a :class:`~custom_networks.nets.unet.PlainUNet`, described by the same
    :class:`~custom_networks.nets.layout.UNetLayout` as the FS / FSNR / AS baselines. A small MLP
    embeds the voxel spacing (``D -> 10 -> 10 -> 50`` by default, ReLU after every layer); one
    linear head per layer of the UNet maps the embedding to that layer's weight and bias (for
    InstanceNorm: scale and shift), squashed by ``tanh(x) * output_scale``.

    Samples of a batch that share a spacing share one generated weight set and run as one batched
    convolution; a batch of ``U`` distinct spacings runs ``U`` groups. In eval mode under
    ``torch.no_grad()`` / ``torch.inference_mode()``, generated weights are cached per spacing (up
    to ``cache_size`` spacings); the cache is dropped whenever a parameter changes (optimiser
    step, ``load_state_dict``, ``.to(device)``).

    Args:
        spatial_dims, in_channels, out_channels, channels, convs_per_level, kernel_size,
        up_kernel_size: the primary UNet's :class:`UNetLayout`.
        hidden_features: widths of the spacing MLP (paper: ``(10, 10, 50)``, SPIDER ``(10, 10, 20)``).
        output_scale: the heads output ``tanh(x) * output_scale`` (paper: 5).
        cache_size: spacings whose generated weights are kept in eval mode.
        kink_range_mm: spacings (mm) over which the first MLP layer's ReLU kinks are spread at
            initialisation.
        layout: a ready layout instead of the layout fields.

    Shapes:
        ``forward(x, spacing)``: ``x`` is ``(B, in_channels, *spatial)``; ``spacing`` is ``(B, D)``
        in mm, in the order of ``x``'s spatial axes (``MetaTensor.pixdim`` for MONAI images); a
        ``(D,)`` or ``(1, D)`` spacing applies to the whole batch. Returns ``(B, out_channels,
        *spatial)`` logits.

    Example::

        >>> net = HyperUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16))
        >>> x = torch.randn(2, 1, 32, 32, 16)
        >>> net(x, torch.tensor([[1.0, 1.0, 3.0], [2.0, 2.0, 2.0]])).shape
        torch.Size([2, 2, 32, 32, 16])
        >>> unet = net.generate((1.0, 1.0, 3.0))  # a PlainUNet holding the generated weights
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
        hidden_features: Sequence[int] = (10, 10, 50),
        output_scale: float = 5.0,
        cache_size: int = 8,
        kink_range_mm: Sequence[float] = (0.5, 4.0),
        layout: UNetLayout | None = None,
    ):
        template = PlainUNet(
            spatial_dims, in_channels, out_channels, channels, convs_per_level, kernel_size, up_kernel_size, layout=layout
        )
        super().__init__(
            template,
            spatial_dims=template.layout.spatial_dims,
            hidden_features=hidden_features,
            output_scale=output_scale,
            cache_size=cache_size,
            kink_range_mm=kink_range_mm,
            pass_spacing=False,
        )
        self.layout = template.layout

    def _check_input(self, x) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; expected (B, {self.layout.in_channels}, "
                f"{', '.join('S' * self.spatial_dims)}) for a {self.spatial_dims}D HyperUNet."
            )

    def generate(self, spacing) -> PlainUNet:
        """The UNet factory: a :class:`PlainUNet` holding the weights generated for ``spacing``.

        Args:
            spacing: ``D`` spacings in mm (tensor axis order), a number for isotropic spacing,
                or a string such as ``"1.5,1.5,3"``.

        Returns:
            a ``PlainUNet`` (eval mode, on this network's device) whose output equals
            ``forward(x, spacing)``; TorchScript-exportable with ``torch.jit.script``.
        """
        return super().generate(spacing)
