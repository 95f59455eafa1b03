"""HyperSpace for any network: a hypernetwork that generates a module's parameters from the voxel spacing."""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections import OrderedDict
from typing import Callable, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call

from ..spacing import as_spacing_tensor, parse_spacing

__all__ = ["HyperNetwork"]

# which of the primary network's parameters are generated: all, a list of fnmatch patterns of
# parameter names (e.g. ["*conv*", "*norm*"]), or a predicate of (parameter name, owning module)
Selection = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _selector(generate: Selection) -> Callable[[str, nn.Module], bool]:
    if generate is None or generate == "all":
        return lambda name, module: True
    if callable(generate):
        return generate
    patterns = [generate] if isinstance(generate, str) else list(generate)
    if not patterns:
        raise ValueError("generate is an empty list: no parameter of the primary network would be generated.")
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class HyperNetwork(nn.Module):
    """Spacing-conditioned weights for any ``nn.Module`` (Joutard et al., "HyperSpace", MICCAI 2024).

    A small MLP embeds the voxel spacing (``D -> 10 -> 10 -> 50`` by default, ReLU after every
    layer). For every module of ``primary`` that owns generated parameters, one linear head (the
    paper's per-layer heads) maps the embedding to all of that module's generated parameters,
    squashed by ``tanh(x) * output_scale``. The primary network is then run with
    ``torch.func.functional_call`` on the generated tensors; it holds no state of its own and is
    kept on the meta device (no memory). Parameters left out of ``generate`` (for example the last
    head) stay ordinary trainable parameters, shared by all spacings; buffers (BatchNorm running
    statistics) are kept and updated as usual.

    Samples of a batch that share a spacing share one generated weight set and run as one batched
    call of the primary network; a batch of ``U`` distinct spacings runs ``U`` calls, whose
    outputs are put back in batch order. This is exact for any network whose samples do not
    interact: convolutions, Instance/Group/LayerNorm, attention within a sample. For BatchNorm in
    training mode the batch statistics are those of each spacing group, not of the whole batch
    (in eval mode it is exact). In eval mode under ``torch.no_grad()`` /
    ``torch.inference_mode()``, generated weights are cached per spacing (up to ``cache_size``
    spacings); the cache is dropped whenever a parameter changes (optimiser step,
    ``load_state_dict``, ``.to(device)``).

    Args:
        primary: the network whose parameters are generated, built as usual (its own
            initialisation is the starting point of the generated weights). It is used as a
            template; the instance is not modified.
        spatial_dims: number of spacing values (the image's spatial dimensions).
        generate: which parameters are generated: ``None`` / ``"all"``, fnmatch patterns of
            parameter names (``["down.*", "up.*"]``), or a predicate ``(name, module) -> bool``.
        hidden_features: widths of the spacing MLP (paper: ``(10, 10, 50)``, SPIDER ``(10, 10, 20)``).
        output_scale: the heads output ``tanh(x) * output_scale`` (paper: 5).
        cache_size: spacings whose generated weights are kept in eval mode.
        kink_range_mm: spacings (mm) over which the first MLP layer's ReLU kinks are spread at
            initialisation (see ``_init_embedding``).
        pass_spacing: hand ``spacing=(B_u, D)`` to the primary network's forward; default: when
            its forward has a ``spacing`` argument (a spacing-aware primary such as the SDN U-Net).

    Shapes:
        ``forward(x, spacing)``: ``x`` is ``(B, C, *spatial)``; ``spacing`` is ``(B, D)`` in mm, in
        the order of ``x``'s spatial axes (``MetaTensor.pixdim`` for MONAI images); a ``(D,)`` or
        ``(1, D)`` spacing applies to the whole batch. Returns what ``primary`` returns.

    Example::

        >>> from monai.networks.nets import BasicUNet
        >>> net = HyperNetwork(BasicUNet(spatial_dims=3, features=(8, 8, 16, 32, 64, 8)), spatial_dims=3)
        >>> net(torch.randn(2, 1, 32, 32, 16), torch.tensor([[1.0, 1.0, 3.0], [2.0, 2.0, 2.0]])).shape
        torch.Size([2, 2, 32, 32, 16])
        >>> plain = net.generate((1.0, 1.0, 3.0))  # a BasicUNet holding the generated weights
    """

    def __init__(
        self,
        primary: nn.Module,
        spatial_dims: int = 3,
        generate: Selection = None,
        hidden_features: Sequence[int] = (10, 10, 50),
        output_scale: float = 5.0,
        cache_size: int = 8,
        kink_range_mm: Sequence[float] = (0.5, 4.0),
        pass_spacing: bool | None = None,
    ):
        super().__init__()
        if int(spatial_dims) < 1:
            raise ValueError(f"spatial_dims must be >= 1, got {spatial_dims!r}.")
        self._spatial_dims = int(spatial_dims)
        self.output_scale = float(output_scale)
        self.cache_size = int(cache_size)
        if pass_spacing is None:
            pass_spacing = "spacing" in inspect.signature(primary.forward).parameters
        self.pass_spacing = bool(pass_spacing)

        dims = [self._spatial_dims, *[int(h) for h in hidden_features]]
        embed: list[nn.Module] = []
        for f_in, f_out in zip(dims[:-1], dims[1:]):
            embed += [nn.Linear(f_in, f_out), nn.ReLU()]
        self.embed = nn.Sequential(*embed)
        self._init_embedding(embed[0], kink_range_mm)

        # one head per module that owns generated parameters, read off the primary network's own
        # parameters, so that the heads always match it (the paper's per-layer heads)
        selected = _selector(generate)
        self._groups: list[list[tuple[str, torch.Size]]] = []
        self._static_names: list[str] = []
        heads, static = [], []
        for module_name, module in primary.named_modules():
            group = []
            for name, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if selected(full, module):
                    group.append((full, p))
                else:
                    self._static_names.append(full)
                    static.append(nn.Parameter(p.detach().clone()))
            if group:
                self._groups.append([(name, p.shape) for name, p in group])
                heads.append(self._init_head(dims[-1], [p for _, p in group], module))
        if not heads:
            raise ValueError(f"generate={generate!r} selects no parameter of the {type(primary).__name__}.")
        self.heads = nn.ModuleList(heads)
        # parameters shared by all spacings, and the primary's buffers, in flat containers
        # (their names hold dots, which module attribute names cannot)
        self.static = nn.ParameterList(static)
        self._buffer_names = [name for name, _ in primary.named_buffers()]
        self.primary_buffers = nn.Module()
        for i, (_, b) in enumerate(primary.named_buffers()):
            self.primary_buffers.register_buffer(str(i), b.detach().clone())
        # the primary network only provides the computation: functional_call swaps in the tensors
        self._template = (copy.deepcopy(primary).to("meta"),)
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
        # the primary network's own initialisation (in the bias, through atanh) plus a
        # spacing-dependent part of comparable size, so the generated network trains like itself.
        head = nn.Linear(features, sum(t.numel() for t in init))
        target = torch.cat([t.detach().reshape(-1) for t in init]) / self.output_scale
        if isinstance(module, _NORMS) or head.weight.is_meta:  # on the meta device: the structure only
            spread = 0.1
        else:
            spread = float(init[0].detach().float().std().nan_to_num(0.1))
        with torch.no_grad():
            head.bias.copy_(torch.atanh(target.clamp(-0.99, 0.99)))
            head.weight.normal_(0.0, spread / (self.output_scale * features**0.5))
        return head

    @property
    def spatial_dims(self) -> int:
        return self._spatial_dims

    @property
    def primary(self) -> nn.Module:
        """The primary network (on the meta device: its structure, not its weights)."""
        return self._template[0]

    def _shared_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(zip(self._static_names, self.static))
        tensors.update(zip(self._buffer_names, (self.primary_buffers.get_buffer(str(i)) for i in range(len(self._buffer_names)))))
        return tensors

    def generate_params(self, spacing: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """All tensors of the primary network for each row of ``spacing`` ``(U, D)`` (mm).

        Returns one dict per row, keyed like ``primary.state_dict()``: the generated parameters,
        the parameters shared by all spacings and the buffers.
        """
        z = self.embed(spacing.to(self.heads[0].weight.dtype))
        shared = self._shared_tensors()
        params: list[dict[str, torch.Tensor]] = [dict(shared) for _ in range(spacing.shape[0])]
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

    def params_for(self, spacing: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """:meth:`generate_params` for the rows of ``spacing`` ``(U, D)`` (mm), through the
        per-spacing cache in eval mode without gradients (the generated tensors of a cache hit are
        the very tensors of the first call, so a caller may compare them by identity)."""
        if self.training or torch.is_grad_enabled():
            return self.generate_params(spacing)
        # any optimiser step or load_state_dict bumps a parameter's version counter; .to() or
        # .cuda() changes its storage: either way the cached weights are stale
        state = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if state != self._cache_state:
            self._cache.clear()
            self._cache_state = state
        keys = [tuple(row) for row in spacing.tolist()]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            for i, p in zip(missing, self.generate_params(spacing[missing])):
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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; expected (B, C, {', '.join('S' * self.spatial_dims)}) "
                f"for a {self.spatial_dims}D {type(self).__name__}."
            )

    def _call(self, params: dict[str, torch.Tensor], x: torch.Tensor, spacing: torch.Tensor):
        kwargs = {"spacing": spacing} if self.pass_spacing else {}
        return functional_call(self.primary, params, (x,), kwargs)

    def forward(self, x: torch.Tensor, spacing) -> torch.Tensor:
        self._check_input(x)
        spacing = as_spacing_tensor(spacing, x.shape[0], self.spatial_dims, device=self.heads[0].weight.device)
        if hasattr(x, "as_tensor"):  # a MONAI MetaTensor: its metadata has no use inside the network
            x = x.as_tensor()
        unique, inverse = torch.unique(spacing, dim=0, return_inverse=True)
        params = self.params_for(unique)
        if len(params) == 1:
            return self._call(params[0], x, spacing.to(x.device))
        out = None
        for u, p in enumerate(params):
            index = (inverse == u).nonzero().squeeze(1).to(x.device)
            y = self._call(p, x.index_select(0, index), spacing.to(x.device).index_select(0, index))
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out = out.index_copy(0, index, y)
        return out

    @torch.no_grad()
    def generate(self, spacing) -> nn.Module:
        """A plain module of the primary network's class holding the weights for ``spacing``.

        Args:
            spacing: ``D`` spacings in mm (tensor axis order), a number for isotropic spacing,
                or a string such as ``"1.5,1.5,3"``.

        Returns:
            the primary network (eval mode, on this network's device) whose output equals
            ``forward(x, spacing)``; exportable like the primary network (``torch.jit.script`` /
            ``torch.onnx.export`` where the class supports it).
        """
        spacing = parse_spacing(spacing, self.spatial_dims)
        device = self.heads[0].weight.device
        params = self.generate_params(torch.tensor([spacing], device=device))[0]
        net = copy.deepcopy(self.primary).to_empty(device=device)
        net.load_state_dict({k: v.detach().clone() for k, v in params.items()})
        return net.eval()
