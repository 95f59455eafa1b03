"""Layer-similarity analysis of (generated) UNets with linear CKA (HyperSpace paper, 3.2 / 4.3).

The paper compares the activations "after convolution and nonlinearity layers" of UNets generated
for different spacings with linear Centered Kernel Alignment (Kornblith et al., ICML 2019):

* :func:`linear_cka` -- CKA between two activation matrices of the same ``n`` examples;
* :func:`conv_activations` -- the activations of every block and of the head of a
  :class:`~custom_networks.nets.unet.PlainUNet` (e.g. from :meth:`HyperUNet.generate`);
* :func:`cka_matrix` -- CKA between every pair of layers of two such activation sets, with the
  layers brought to a common spatial grid so that the rows compare the same physical locations.

Example::

    >>> net = HyperUNet(spatial_dims=3, channels=(8, 16), convs_per_level=1)
    >>> x = torch.randn(2, 1, 32, 32, 32)
    >>> acts_1mm = conv_activations(net.generate(1.0), x)
    >>> acts_2mm = conv_activations(net.generate(2.0), x)
    >>> names_a, names_b, cka = cka_matrix(acts_1mm, acts_2mm, positions=4096)
    >>> cka.shape  # (len(names_a), len(names_b)); cka[i, j] = CKA(names_a[i], names_b[j])
    (6, 6)

For a study across spacings as in the paper, feed each network the same image resampled to its
spacing and cropped to the same physical region; :func:`cka_matrix` then resamples every pair of
layers to a common grid (see there).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nets.unet import ConvBlock, PlainUNet

__all__ = ["linear_cka", "conv_activations", "cka_matrix"]


def _as_float64(a, name: str) -> torch.Tensor:
    t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2D (n, p) activation matrix, got shape {tuple(t.shape)}.")
    return t.to(device="cpu" if t.device.type == "meta" else t.device, dtype=torch.float64)


def linear_cka(x, y) -> float:
    """Linear CKA between two activation matrices of the same ``n`` examples.

    Each column (feature) is centred over the rows, then
    ``CKA = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)``, computed in float64. This equals
    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the Gram matrices ``K = X X^T`` and
    ``L = Y Y^T`` (paper, section 3.2), and the Gram form ``<K, L>_F / (||K||_F ||L||_F)`` is used
    instead whenever it is cheaper (many features, few rows: ``n^2 (p1 + p2) < n (p1 + p2)^2``).

    CKA lies in ``[0, 1]``, is 1 for ``y = x``, and is invariant to isotropic scaling and to
    orthogonal transforms of either matrix's features (not to arbitrary invertible ones).

    Args:
        x: ``(n, p1)`` tensor or array, rows = examples (e.g. voxel positions), columns = features.
        y: ``(n, p2)``, the same ``n`` examples in the same order.

    Returns:
        the CKA as a Python float; ``nan`` if ``x`` or ``y`` is constant over the rows (zero
        after centring), where CKA is undefined.

    Raises:
        ValueError: if an input is not 2D, the row counts differ, or ``n < 2``.
    """
    x = _as_float64(x, "x")
    y = _as_float64(y, "y").to(x.device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs the same examples (rows) in x and y, got x {tuple(x.shape)} and y {tuple(y.shape)}."
        )
    n, p1, p2 = x.shape[0], x.shape[1], y.shape[1]
    if n < 2:
        raise ValueError(f"linear_cka needs n >= 2 examples (rows), got x {tuple(x.shape)} and y {tuple(y.shape)}.")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if n * n * (p1 + p2) < n * (p1 + p2) ** 2:  # Gram form: K, L are (n, n)
        k, l_ = x @ x.T, y @ y.T
        cross = (k * l_).sum()
        norm_x, norm_y = torch.linalg.matrix_norm(k), torch.linalg.matrix_norm(l_)
    else:  # feature form: (p2, p1), (p1, p1), (p2, p2)
        cross = torch.linalg.matrix_norm(y.T @ x) ** 2
        norm_x, norm_y = torch.linalg.matrix_norm(x.T @ x), torch.linalg.matrix_norm(y.T @ y)
    denom = float(norm_x * norm_y)
    if denom == 0.0:
        return float("nan")
    return float(cross) / denom


@torch.no_grad()
def conv_activations(unet: PlainUNet, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The activations after each conv + nonlinearity of a UNet, and its output, for input ``x``.

    One entry per :class:`~custom_networks.nets.unet.ConvBlock` (encoder and decoder) and one for the
    ``head`` (the logits), keyed by module name (``"down.0.0"``, ..., ``"up.0.convs.0"``, ...,
    ``"head"``) in the order the modules run in the forward pass.

    The hook sits on the whole ``ConvBlock`` (conv -> ReLU -> InstanceNorm), not on its ReLU: the
    block's output is the representation the next layer (and a skip connection) actually
    receives, and since linear CKA is not invariant to the per-channel, per-sample rescaling of
    the instance norm, the ReLU output would measure a representation no layer consumes. (The
    ReLU is also ``inplace=True``, so its output aliases the conv output.) The transposed
    convolutions of the decoder are not recorded on their own; their result enters the next
    block.

    Forward hooks are registered for the call and removed afterwards, also when the forward pass
    raises. The network's mode is left as it is (call ``unet.eval()`` first if it matters; the
    HyperSpace UNet has no dropout and its InstanceNorm keeps no running statistics).

    Args:
        unet: a :class:`PlainUNet`, e.g. from :meth:`HyperUNet.generate`, or any module whose
            layers of interest are ``ConvBlock`` s and a child named ``head``.
        x: ``(B, in_channels, *spatial)`` input on the network's device.

    Returns:
        ``{name: tensor}``, each a detached copy of shape ``(B, C_layer, *spatial_layer)``
        (level ``l`` of the encoder has spatial size ``ceil(spatial / 2**l)``; the head's
        ``(B, out_channels, *spatial)`` equals ``unet(x)``).

    Raises:
        TypeError: if ``unet`` has no ``ConvBlock``.
        RuntimeError: if a recorded module runs more than once in one forward pass.
    """
    targets = [(name, m) for name, m in unet.named_modules() if isinstance(m, ConvBlock)]
    head = getattr(unet, "head", None)
    if isinstance(head, nn.Module):
        targets.append(("head", head))
    if not any(isinstance(m, ConvBlock) for _, m in targets):
        raise TypeError(f"conv_activations expects a PlainUNet (a module with ConvBlocks), got {type(unet).__name__}.")

    acts: Dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            if name in acts:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass; activations would be ambiguous.")
            acts[name] = output.detach().clone()

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in targets]
    try:
        unet(x)
    finally:
        for h in handles:
            h.remove()
    return acts


def _common_grid(shape_a: Sequence[int], shape_b: Sequence[int]) -> Tuple[int, ...]:
    # the coarser of the two grids, axis by axis
    return tuple(min(int(a), int(b)) for a, b in zip(shape_a, shape_b))


def _resample(t: torch.Tensor, size: Tuple[int, ...], mode: str) -> torch.Tensor:
    if tuple(t.shape[2:]) == size:
        return t
    if mode == "linear":
        interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        return F.interpolate(t, size=size, mode=interp, align_corners=False)
    if mode == "area":
        return F.interpolate(t, size=size, mode="area")
    raise ValueError(f"resample must be 'linear' or 'area', got {mode!r}.")


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (B, C, *spatial) -> (B * prod(spatial), C): one row per (sample, voxel) position
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def cka_matrix(
    acts_a: Dict[str, torch.Tensor],
    acts_b: Dict[str, torch.Tensor],
    positions: Optional[int] = None,
    seed: int = 0,
    resample: str = "linear",
) -> Tuple[List[str], List[str], np.ndarray]:
    """Linear CKA between every layer of ``acts_a`` and every layer of ``acts_b``.

    Each activation ``(B, C, *spatial)`` is flattened to a ``(positions, C)`` matrix whose rows
    are the ``B * prod(spatial)`` (sample, voxel) positions and whose columns are the channels;
    :func:`linear_cka` then compares the two layers over the same rows.

    Common-grid rule: rows of the two matrices must be the same physical locations. All
    activations are assumed to cover the same physical region (the network input's field of
    view -- true for the UNet's levels when the input size is a multiple of
    ``layout.divisor``, approximately otherwise; across networks of different spacings, feed
    inputs of the same physical extent). For each pair of layers, both are resampled to the
    coarser of their two grids (per axis, the smaller size) with
    ``F.interpolate(mode="trilinear" / "bilinear", align_corners=False)`` -- aligning the voxel
    edges, i.e. the field of view; a factor-2 reduction then averages each 2x2(x2) voxel
    cell. A layer is never upsampled, so no positions are invented. With ``resample="area"``
    the finer layer is average-pooled instead (no aliasing for factors above 2).

    Subsampling: if ``positions`` is given and smaller than the number of rows ``n`` of a pair,
    the same ``positions`` rows are taken from both matrices, drawn without replacement by a
    ``torch.Generator`` seeded with ``seed``; pairs that share a common grid share the rows.

    Args:
        acts_a, acts_b: ``{layer name: (B, C, *spatial)}`` as returned by
            :func:`conv_activations`, with the same batch ``B`` (the same images) and spatial
            rank; they may be the same dict (intra-network CKA).
        positions: rows per CKA, or ``None`` for all (``n = B * prod(common grid)``).
        seed: seed of the row subsampling.
        resample: ``"linear"`` (default, as above) or ``"area"``.

    Returns:
        ``(names_a, names_b, cka)`` with ``cka`` a float64 array ``(len(names_a),
        len(names_b))``, ``cka[i, j] = CKA(acts_a[names_a[i]], acts_b[names_b[j]])``.

    Raises:
        ValueError: on an empty dict, activations that are not ``(B, C, *spatial)``, differing
        batch sizes or spatial ranks, ``positions < 2``, or an unknown ``resample``.
    """
    if not acts_a or not acts_b:
        raise ValueError("cka_matrix needs at least one activation in each dict.")
    if positions is not None and int(positions) < 2:
        raise ValueError(f"positions must be >= 2 (or None for all), got {positions!r}.")
    if resample not in ("linear", "area"):
        raise ValueError(f"resample must be 'linear' or 'area', got {resample!r}.")
    ref = next(iter(acts_a.values()))
    for name, t in [*acts_a.items(), *acts_b.items()]:
        if t.dim() not in (3, 4, 5) or t.dim() != ref.dim() or t.shape[0] != ref.shape[0]:
            raise ValueError(
                f"all activations must be (B, C, *spatial) with the same B and spatial rank; layer "
                f"{name!r} has shape {tuple(t.shape)}, the first one {tuple(ref.shape)}."
            )
    names_a, names_b = list(acts_a), list(acts_b)
    resampled: Dict[Tuple[int, str, Tuple[int, ...]], torch.Tensor] = {}
    row_index: Dict[int, Optional[torch.Tensor]] = {}

    def rows(side: int, name: str, t: torch.Tensor, grid: Tuple[int, ...]) -> torch.Tensor:
        key = (side, name, grid)
        if key not in resampled:
            resampled[key] = _rows(_resample(t.detach().to(torch.float64), grid, resample))
        r = resampled[key]
        n = r.shape[0]
        if n not in row_index:
            if positions is None or int(positions) >= n:
                row_index[n] = None
            else:
                g = torch.Generator().manual_seed(int(seed))
                row_index[n] = torch.randperm(n, generator=g)[: int(positions)]
        idx = row_index[n]
        return r if idx is None else r[idx.to(r.device)]

    out = np.empty((len(names_a), len(names_b)), dtype=np.float64)
    same = acts_a is acts_b
    for i, na in enumerate(names_a):
        for j, nb in enumerate(names_b):
            if same and j < i:
                out[i, j] = out[j, i]
                continue
            ta, tb = acts_a[na], acts_b[nb]
            grid = _common_grid(ta.shape[2:], tb.shape[2:])
            out[i, j] = linear_cka(rows(0, na, ta, grid), rows(0 if same else 1, nb, tb, grid))
    return names_a, names_b, out
