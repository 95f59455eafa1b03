"""HyperSpace: a hypernetwork that turns a voxel spacing into all weights of a UNet."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from .layout import UNetLayout
from .spacing import as_spacing_tensor, parse_spacing
from .unet import PlainUNet

__all__ = ["HyperUNet"]


class HyperUNet(nn.Module):
    """Spacing-conditioned UNet (Joutard et al., "HyperSpace", MICCAI 2024, arXiv:2407.03681).

    A small MLP embeds the voxel spacing (``D -> 10 -> 10 -> 50`` by default, ReLU after every
    layer); one linear head per layer of the primary UNet maps the embedding to that layer's
    weight and bias (for InstanceNorm: scale and shift), squashed by ``tanh(x) * output_scale``.
    Only the hypernetwork has trainable parameters; the primary UNet, described by the same
    :class:`~custom_networks.layout.UNetLayout` as :class:`~custom_networks.unet.PlainUNet`, is
    run with the generated tensors.

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
            initialisation (see ``_init_embedding``).
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
        super().__init__()
        template = PlainUNet(
            spatial_dims, in_channels, out_channels, channels, convs_per_level, kernel_size, up_kernel_size, layout=layout
        )
        self.layout = template.layout
        self.output_scale = float(output_scale)
        self.cache_size = int(cache_size)

        dims = [self.layout.spatial_dims, *[int(h) for h in hidden_features]]
        embed: list[nn.Module] = []
        for f_in, f_out in zip(dims[:-1], dims[1:]):
            embed += [nn.Linear(f_in, f_out), nn.ReLU()]
        self.embed = nn.Sequential(*embed)
        self._init_embedding(embed[0], kink_range_mm)

        # one head per layer of the primary UNet, read off the UNet's own parameters so that the
        # heads always match the layout (the paper's per-layer heads)
        init_values = dict(template.named_parameters())
        self._groups: list[list[tuple[str, torch.Size]]] = []
        heads = []
        for module_name, module in template.named_modules():
            params = list(module.named_parameters(recurse=False))
            if not params:
                continue
            group = [(f"{module_name}.{name}", p.shape) for name, p in params]
            self._groups.append(group)
            heads.append(self._init_head(dims[-1], [init_values[name] for name, _ in group], module))
        self.heads = nn.ModuleList(heads)
        # the primary UNet only provides the computation: functional_call swaps in the generated
        # tensors, so it holds no trainable state and lives on the meta device (no memory)
        self._template = (template.to("meta"),)
        self._cache: OrderedDict[tuple[float, ...], dict[str, torch.Tensor]] = OrderedDict()
        self._cache_state: tuple = ()
        self.generation_count = 0  # weight sets generated so far (cache misses); for monitoring

    @staticmethod
    def _init_embedding(first: nn.Linear, kink_range_mm: Sequence[float]) -> None:
        # With PyTorch's default init most first-layer units are linear or dead over the whole
        # range of plausible spacings, the embedding barely varies with the spacing, and the
        # heads learn spacing-dependent weights slowly (on the size task of tests/test_learning.py
        # the network stayed spacing-blind for 25 s of CPU training). Non-negative input weights
        # and kinks spread over ``kink_range_mm`` make the embedding a piecewise-linear basis of
        # the spacing from the start; the architecture is unchanged.
        low, high = (float(v) for v in kink_range_mm)
        with torch.no_grad():
            first.weight.copy_(torch.randn_like(first.weight).abs())
            kinks = torch.linspace(low, high, first.out_features)
            first.bias.copy_(-kinks * first.weight.sum(1))

    def _init_head(self, features: int, init: list[torch.Tensor], module: nn.Module) -> nn.Linear:
        # Default nn.Linear init would generate weights orders of magnitude too large. Start at
        # the primary UNet's own default initialisation (in the bias, through atanh) plus a
        # spacing-dependent part of comparable size, so the generated UNet trains like a UNet.
        head = nn.Linear(features, sum(t.numel() for t in init))
        target = torch.cat([t.detach().reshape(-1) for t in init]) / self.output_scale
        is_norm = isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d))
        spread = 0.1 if is_norm else float(init[0].detach().std())
        with torch.no_grad():
            head.bias.copy_(torch.atanh(target.clamp(-0.99, 0.99)))
            head.weight.normal_(0.0, spread / (self.output_scale * features**0.5))
        return head

    @property
    def spatial_dims(self) -> int:
        return self.layout.spatial_dims

    def generate_params(self, spacing: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Weights of the primary UNet for each row of ``spacing`` ``(U, D)`` (mm).

        Returns one ``{parameter name: tensor}`` dict per row, keyed like ``PlainUNet.state_dict()``.
        """
        z = self.embed(spacing.to(self.heads[0].weight.dtype))
        params: list[dict[str, torch.Tensor]] = [{} for _ in range(spacing.shape[0])]
        for head, group in zip(self.heads, self._groups):
            flat = torch.tanh(head(z)) * self.output_scale
            offset = 0
            for name, shape in group:
                n = shape.numel()
                for u in range(spacing.shape[0]):
                    params[u][name] = flat[u, offset : offset + n].view(shape)
                offset += n
        self.generation_count += spacing.shape[0]
        return params

    def _params_for(self, unique: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if self.training or torch.is_grad_enabled():
            return self.generate_params(unique)
        # any optimiser step or load_state_dict bumps a parameter's version counter; .to() or
        # .cuda() changes its storage: either way the cached weights are stale
        state = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if state != self._cache_state:
            self._cache.clear()
            self._cache_state = state
        keys = [tuple(row) for row in unique.tolist()]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            for i, p in zip(missing, self.generate_params(unique[missing])):
                self._cache[keys[i]] = p
        out = []
        for k in keys:
            self._cache.move_to_end(k)
            out.append(self._cache[k])
        while len(self._cache) > max(self.cache_size, len(keys)):
            self._cache.popitem(last=False)
        return out

    def clear_cache(self) -> None:
        """Drop all cached weight sets."""
        self._cache.clear()

    def forward(self, x: torch.Tensor, spacing) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; expected (B, {self.layout.in_channels}, "
                f"{', '.join('S' * self.spatial_dims)}) for a {self.spatial_dims}D HyperUNet."
            )
        spacing = as_spacing_tensor(spacing, x.shape[0], self.spatial_dims, device=self.heads[0].weight.device)
        if hasattr(x, "as_tensor"):  # a MONAI MetaTensor: its metadata has no use inside the network
            x = x.as_tensor()
        unique, inverse = torch.unique(spacing, dim=0, return_inverse=True)
        params = self._params_for(unique)
        template = self._template[0]
        if len(params) == 1:
            return functional_call(template, params[0], (x,))
        out = None
        for u, p in enumerate(params):
            index = (inverse == u).nonzero().squeeze(1).to(x.device)
            y = functional_call(template, p, (x.index_select(0, index),))
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, index, y)
        return out

    @torch.no_grad()
    def generate(self, spacing) -> PlainUNet:
        """The UNet factory: a :class:`PlainUNet` holding the weights generated for ``spacing``.

        Args:
            spacing: ``D`` spacings in mm (tensor axis order), a number for isotropic spacing,
                or a string such as ``"1.5,1.5,3"``.

        Returns:
            a ``PlainUNet`` (eval mode, on this network's device) whose output equals
            ``forward(x, spacing)``; TorchScript-exportable with ``torch.jit.script``.
        """
        spacing = parse_spacing(spacing, self.spatial_dims)
        device = self.heads[0].weight.device
        params = self.generate_params(torch.tensor([spacing], device=device))[0]
        net = PlainUNet(layout=self.layout).to(device)
        net.load_state_dict({k: v.detach().clone() for k, v in params.items()})
        return net.eval()
