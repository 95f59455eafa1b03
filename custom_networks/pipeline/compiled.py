"""Fast inference for generated UNets: weights once per spacing, a compiled forward, shape buckets.

:class:`UNetEngine` wraps a :class:`~custom_networks.nets.hyperspace.HyperUNet` (or a
:class:`~custom_networks.nets.unet.PlainUNet` baseline) for inference:

- the weights for a spacing are generated once and kept (the HyperUNet's own per-spacing cache);
  they are copied into one resident UNet only when the spacing changes, so the hypernetwork costs
  nothing on a cache hit;
- that UNet's forward goes through ``torch.compile`` (fusing the InstanceNorm + ReLU passes that
  eager PyTorch runs one by one) under bf16 autocast on CUDA;
- inputs are zero-padded to a few shape buckets (multiples of ``bucket`` voxels per axis), so a
  server that sees many image sizes compiles once per bucket, not once per size.

Padding must not change the answer. A plain zero pad would: InstanceNorm statistics would include
the padding and the convolutions at the border would see its activations. The bucketed call
therefore hands the UNet's own forward a mask of the real voxels per resolution level
(``PlainUNet.forward(x, masks=...)``): it takes the InstanceNorm statistics over the real voxels
only and zeroes the padding after every block, which reproduces
the unpadded forward exactly (up to float rounding); the padding is cropped off the output.

Without CUDA (``compile="auto"``) or with ``compile=False`` the UNet runs its plain eager forward
on the unpadded input; if compilation fails (no C++ compiler for the CPU backend, an unsupported
platform) the engine logs a warning and falls back to that, with the same numbers.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.utils import str2bool
from torch import nn

from ..nets.hyperspace import HyperUNet
from ..spacing import as_spacing_tensor
from ..nets.unet import PlainUNet

__all__ = ["UNetEngine", "bucket_shape", "compile_flag", "compile_network", "level_masks"]

logger = logging.getLogger(__name__)


def bucket_shape(shape: Sequence[int], bucket: int) -> tuple[int, ...]:
    """``shape`` rounded up per axis to a multiple of ``bucket`` voxels."""
    return tuple(-(-int(s) // bucket) * bucket for s in shape)


def level_masks(valid: Sequence[int], padded: Sequence[int], levels: int, device) -> list[torch.Tensor]:
    """``(1, 1, *padded_l)`` float masks of the real voxels at each resolution level, the
    ``masks`` argument of :meth:`PlainUNet.forward <custom_networks.nets.unet.PlainUNet.forward>`.

    A stride-2 convolution (kernel 3, padding 1) maps ``n`` voxels to ``ceil(n / 2)``, so level
    ``l`` holds ``ceil(n / 2**l)`` real voxels of ``padded / 2**l``.
    """
    masks = []
    for level in range(levels):
        n = [math.ceil(v / 2**level) for v in valid]
        p = [s // 2**level for s in padded]
        m = torch.zeros((1, 1, *p), device=device)
        m[(slice(None), slice(None), *[slice(0, k) for k in n])] = 1.0
        masks.append(m)
    return masks


def _padded_forward(unet: PlainUNet, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    # the network's own forward, given the masks of the real voxels (compiled once per bucket)
    return unet(x, None, masks)


def compile_flag(value, allow_auto: bool = True) -> bool | str:
    """A compile option as given in a config or on a command line: ``True``/``False`` or the
    strings MONAI's ``str2bool`` reads (``true``/``false``/``yes``/``no``/``1``/``0``, ...), or
    ``auto`` where allowed."""
    if isinstance(value, bool):
        return value
    if allow_auto and str(value).strip().lower() == "auto":
        return "auto"
    try:
        return str2bool(str(value).strip())
    except ValueError:
        raise ValueError(f"compile {value!r} must be true, false{' or auto' if allow_auto else ''}.") from None


def compile_network(network: nn.Module, enabled: bool | str = True, **compile_kwargs) -> nn.Module:
    """``network`` with its forward compiled in place (``nn.Module.compile``), for training.

    In place, so that ``state_dict`` keys stay those of the network and checkpoints load into an
    uncompiled one. (MONAI's ``SupervisedTrainer(compile=True)`` fails in MONAI 1.6 when it copies
    collated MetaTensor metadata back onto the outputs.) The hypernetwork's Python-level grouping
    by spacing stays outside the graph; the generated UNet's forward is traced.
    """
    if compile_flag(enabled, allow_auto=False):
        network.compile(**compile_kwargs)
    return network


class UNetEngine(nn.Module):
    """Inference engine for a HyperUNet (or a PlainUNet): cached weights, compiled, bucketed.

    ``engine(x, spacing)`` returns what ``network(x, spacing)`` returns (float32 logits, same
    shape), so it drops into MONAI inferers and the bundles' evaluator in place of the network.
    Inference only: with gradients enabled it calls the network itself.

    Args:
        network: the trained network; the engine reads its weights at every call, so a
            checkpoint loaded into it later is picked up (the weight cache is invalidated).
        compile: ``True``, ``False`` or ``"auto"`` (compile on CUDA only).
        amp: bf16 autocast; ``None``: on CUDA only.
        bucket: inputs are padded to multiples of this many voxels per axis (rounded up to a
            multiple of the layout's divisor); ``1``: no bucketing beyond the divisor.
        backend, mode: passed to ``torch.compile``.

    Shapes:
        ``x`` is ``(B, in_channels, *spatial)``; ``spacing`` is ``(B, D)`` mm (one spacing per
        call is the fast path; several are run group by group).
    """

    def __init__(
        self,
        network: nn.Module,
        compile: bool | str = "auto",
        amp: bool | None = None,
        bucket: int = 16,
        backend: str = "inductor",
        mode: str | None = None,
    ):
        super().__init__()
        compile = compile_flag(compile)
        if int(bucket) < 1:
            raise ValueError(f"bucket must be a positive number of voxels, got {bucket!r}.")
        self.network = network
        # any other network (no UNetLayout: an oracle, a peer) is called as it is
        self.layout = getattr(network, "layout", None) if isinstance(network, (HyperUNet, PlainUNet)) else None
        self.compile_mode = compile
        self.amp = amp
        self.bucket = math.lcm(int(bucket), int(self.layout.divisor)) if self.layout is not None else int(bucket)
        self.backend, self.mode = backend, mode
        self._runner: PlainUNet | None = None
        self._loaded: dict | None = None  # the weight set in the runner (held, compared by identity)
        self._compiled = None
        self._failed_buckets: set[tuple[int, ...]] = set()  # padded shapes whose compilation failed
        self._lock = threading.Lock()

    @property
    def compiling(self) -> bool:
        """Whether calls on CUDA (``"auto"``) or on any device (``True``) take the compiled path
        (for a shape bucket whose compilation failed they run eagerly, see :meth:`_run`)."""
        return self.compile_mode is not False

    def _run(self, runner: PlainUNet, x: torch.Tensor) -> torch.Tensor:
        """``runner(x)``: compiled and bucketed where configured, else the plain eager forward."""
        if self.compiling and (self.compile_mode is True or x.device.type == "cuda"):
            valid = tuple(x.shape[2:])
            padded = bucket_shape(valid, self.bucket)
            if padded not in self._failed_buckets:
                pad = [v for s, p in zip(reversed(valid), reversed(padded)) for v in (0, p - s)]
                masks = level_masks(valid, padded, self.layout.levels, x.device)
                try:
                    if self._compiled is None:
                        self._compiled = torch.compile(_padded_forward, backend=self.backend, mode=self.mode, dynamic=False)
                    y = self._compiled(runner, F.pad(x, pad) if any(pad) else x, masks)
                    return y[(slice(None), slice(None), *[slice(0, v) for v in valid])]
                # compilation errors come from many layers (dynamo, inductor, the C++ or Triton
                # toolchain): whatever the cause, this call and later calls of this shape bucket
                # run eagerly with the same numbers, and other buckets still try to compile
                except Exception as e:
                    self._failed_buckets.add(padded)
                    first = str(e).splitlines()[0] if str(e) else ""
                    logger.warning(
                        f"torch.compile failed for inputs padded to {list(padded)} ({type(e).__name__}: {first}); "
                        "running this shape eagerly."
                    )
        return runner(x)

    def _weights_for(self, spacing: torch.Tensor, device: torch.device) -> PlainUNet:
        """The resident UNet holding the weights of ``spacing`` ``(D,)``."""
        if isinstance(self.network, PlainUNet):
            return self.network
        if self._runner is None or next(self._runner.parameters()).device != device:
            self._runner = PlainUNet(layout=self.layout).to(device).eval()
            self._loaded = None
        # the HyperUNet's cache: generated once per spacing, regenerated after a weight change
        params = self.network.params_for(spacing[None])[0]
        if params is not self._loaded:
            for name, p in self._runner.named_parameters():
                p.requires_grad_(False).copy_(params[name])
            self._loaded = params
        return self._runner

    def forward(self, x: torch.Tensor, spacing=None) -> torch.Tensor:
        if self.layout is None or torch.is_grad_enabled() or self.network.training:
            return self.network(x, spacing) if spacing is not None else self.network(x)
        dims = self.layout.spatial_dims
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        amp = self.amp if self.amp is not None else x.device.type == "cuda"
        if isinstance(self.network, HyperUNet):
            spacing = as_spacing_tensor(spacing, x.shape[0], dims, device=x.device)
            unique, inverse = torch.unique(spacing, dim=0, return_inverse=True)
        else:
            unique, inverse = torch.zeros(1, dims, device=x.device), torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        out = None
        with self._lock, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            for u in range(unique.shape[0]):
                index = (inverse == u).nonzero().squeeze(1)
                runner = self._weights_for(unique[u], x.device)
                y = self._run(runner, x if unique.shape[0] == 1 else x.index_select(0, index)).float()
                if unique.shape[0] == 1:
                    return y
                out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
                out = out.index_copy(0, index, y)
        return out
