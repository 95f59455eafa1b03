"""Spatial dependency networks (SDN): a 3D, spacing-aware spatial recurrence and the SDN U-Net.

The SDN layer ("Holistic segmentation with spatial recurrence", Carvalho et al., MIDL 2022, which
builds on the spatial dependency layers of Miladinovic et al., ICLR 2021) sweeps a feature map line
by line with a GRU whose "input" is the three neighbouring states of the previous, already updated,
line and whose "hidden" is the current position's own state. One sweep carries information along
the whole extent of an axis, so a single layer has an image-wide receptive field along it.

* :class:`SDNCell2d` is the original 2D cell, for reference (with the original's sweep-extent bug
  fixed: a column sweep runs over the width, not the height).
* :class:`SDNCell3d` sweeps a ``(B, S, D, H, W)`` state slice by slice along one of
  :data:`DIRECTIONS`; the step length in mm along the swept axis enters its gates.
* :class:`SpatialDependency3d` is the layer: 3x3x3 conv -> tanh -> the sweeps -> 1x1x1 conv;
  :class:`ResSpatialDependency3d` its residual-gated form (ResSDN).
* :class:`SDNUNet` is the project's U-Net (:class:`~custom_networks.nets.layout.UNetLayout`) with
  ResSDN blocks at its coarse levels.

Every parameter is a plain ``nn.Parameter`` of an ordinary submodule and no forward stores
anything on ``self``, so that ``torch.func.functional_call`` can swap in generated weights.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .layout import UNetLayout
from .unet import ConvBlock

__all__ = [
    "DIRECTIONS",
    "ResSpatialDependency3d",
    "SDNCell2d",
    "SDNCell3d",
    "SDNUNet",
    "SpatialDependency3d",
]

#: Sweep directions of :class:`SDNCell3d`, named by the tensor spatial axis of a ``(B, C, D, H, W)``
#: tensor and the sense of the sweep: ``"+W"`` runs from ``w = 0`` to ``w = W - 1``. An integer count
#: ``n`` of directions means the first ``n`` of this order: 3 is one forward sweep per axis, 6 all.
DIRECTIONS = ("+D", "+H", "+W", "-D", "-H", "-W")

_AXIS = {"D": 0, "H": 1, "W": 2}

#: Initial bias of SDNCell3d's update gate ``z`` (input side). The GRU step is
#: ``z * candidate(previous slice) + (1 - z) * own state``; with PyTorch's uniform init ``z`` starts
#: near 0.5 and a fresh cell loses most of what it carries at every slice: over a 40-slice sweep the
#: far end's gradient falls by 1e-10, and an SDN U-Net does not learn to use it. From
#: sigmoid(2) = 0.88 it falls by 1e-3 (the idea of the forget-gate bias of LSTMs).
CARRY_BIAS = 2.0


def _parse_directions(directions: int | str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(directions, int) and not isinstance(directions, bool):
        if not 1 <= directions <= len(DIRECTIONS):
            raise ValueError(f"directions as a count must be 1..{len(DIRECTIONS)}, got {directions}.")
        return DIRECTIONS[:directions]
    names = (directions,) if isinstance(directions, str) else tuple(directions)
    unknown = [d for d in names if d not in DIRECTIONS]
    if not names or unknown:
        raise ValueError(f"directions must be a count or names from {DIRECTIONS}, got {directions!r}.")
    return names


def _log_step_mm(step_mm, batch: int, like: torch.Tensor, name: str = "step_mm") -> torch.Tensor:
    """``(B, 3)`` natural log of the step length in mm per spatial axis (D, H, W); None is 1 mm."""
    if step_mm is None:
        return like.new_zeros(batch, 3)
    step = torch.as_tensor(step_mm, dtype=like.dtype, device=like.device)
    if step.dim() == 1:
        step = step.unsqueeze(0)
    if step.dim() != 2 or step.shape[1] != 3 or step.shape[0] not in (1, batch):
        raise ValueError(
            f"{name} must be (3,) or (B, 3) = (1 or {batch}, 3) mm per spatial axis (D, H, W), "
            f"got shape {tuple(step.shape)}."
        )
    if not bool(torch.isfinite(step).all()) or not bool((step > 0).all()):
        raise ValueError(f"{name} must be finite and > 0 mm, got {step.tolist()}.")
    return step.log().expand(batch, 3)


def _gru_update(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The SDN GRU: ``gi`` = [r_i, z_i, n_i], ``gh`` = [r_h, z_h, n_h] (channels 3S), ``h`` (S)."""
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return z * n + (1 - z) * h


def _uniform_init(module: nn.Module, state_size: int) -> None:
    bound = 1.0 / math.sqrt(state_size)
    for p in module.parameters(recurse=False):
        nn.init.uniform_(p, -bound, bound)


class SDNCell2d(nn.Module):
    """The original 2D SDN cell, one direction (reference for :class:`SDNCell3d`).

    A GRU with state size ``S`` per pixel. Along the sweep, the line ``k`` is updated from the
    already updated line ``k - 1``: the GRU "input" is the three neighbouring states of line
    ``k - 1``, which is a ``Conv1d(S -> 3S, kernel 3, zero padding 1)`` along the line
    (``neighbours``), the "hidden" is the position's own state through a 1x1 ``S -> 3S``
    (``state``)::

        r = sigmoid(r_i + r_h); z = sigmoid(z_i + z_h); n = tanh(n_i + r * n_h)
        s_new = z * n + (1 - z) * h

    The first line of a sweep is not updated. All parameters are initialised U(-1/sqrt(S), 1/sqrt(S)).

    Args:
        state_size: ``S``.
        direction: as in the original, on a ``(B, S, H, W)`` state: 0 columns left -> right,
            1 columns right -> left, 2 rows top -> bottom, 3 rows bottom -> top. Unlike the
            original, a column sweep runs over the width ``W`` (the original looped over ``H``,
            so non-square maps were swept wrongly).

    Shapes: ``(B, S, H, W)`` -> ``(B, S, H, W)``.
    """

    def __init__(self, state_size: int, direction: int):
        super().__init__()
        if direction not in (0, 1, 2, 3):
            raise ValueError(f"direction must be 0, 1, 2 or 3, got {direction!r}.")
        if state_size < 1:
            raise ValueError(f"state_size must be >= 1, got {state_size!r}.")
        self.state_size = state_size
        self.direction = direction
        self.neighbours = nn.Conv1d(state_size, 3 * state_size, 3, padding=1)
        self.state = nn.Conv1d(state_size, 3 * state_size, 1)
        for m in (self.neighbours, self.state):
            _uniform_init(m, state_size)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        axis = 3 if self.direction in (0, 1) else 2  # columns follow each other along W, rows along H
        lines = states.movedim(axis, 0)  # (L, B, S, P), P the extent of a line
        n, b, s, p = lines.shape
        hidden = self.state(lines.reshape(n * b, s, p)).reshape(n, b, 3 * s, p)
        order = list(range(n))
        if self.direction in (1, 3):
            order.reverse()
        out = [lines[order[0]]]
        for k in order[1:]:
            out.append(_gru_update(self.neighbours(out[-1]), hidden[k], lines[k]))
        if self.direction in (1, 3):
            out.reverse()
        return torch.stack(out, 0).movedim(0, axis)


def _sweep3d(
    states: torch.Tensor,
    log_step: torch.Tensor,
    w_neighbours: torch.Tensor,
    b_neighbours: torch.Tensor,
    w_state: torch.Tensor,
    b_state: torch.Tensor,
    step_gain: torch.Tensor,
    axis: int,
    reverse: bool,
) -> torch.Tensor:
    # the weights are arguments, not read from a module, so that a checkpointed recomputation
    # uses the same (possibly generated, functional_call) weights as the forward pass
    hidden = F.conv3d(states, w_state, b_state).movedim(2 + axis, 0)  # (L, B, 3S, P, Q), all at once
    slices = states.movedim(2 + axis, 0)  # (L, B, S, P, Q)
    gain = (step_gain[None, :] * log_step[:, None])[:, :, None, None]  # (B, 3S, 1, 1)
    order = list(range(slices.shape[0]))
    if reverse:
        order.reverse()
    out = [slices[order[0]]]
    for k in order[1:]:
        gi = F.conv2d(out[-1], w_neighbours, b_neighbours, padding=1) + gain
        out.append(_gru_update(gi, hidden[k], slices[k]))
    if reverse:
        out.reverse()
    return torch.stack(out, 0).movedim(0, 2 + axis)


class SDNCell3d(nn.Module):
    """The SDN cell in 3D, one direction, aware of the step length in mm.

    Sweeps a ``(B, S, D, H, W)`` state slice by slice along one spatial axis. The slice ``k`` is
    updated from the already updated slice ``k - 1`` with the GRU of :class:`SDNCell2d`: the
    "input" is a ``Conv2d(S -> 3S, 3x3, zero padding 1)`` over slice ``k - 1`` (``neighbours``;
    its two kernel axes are the slice's two remaining tensor axes in order, e.g. (D, H) for a W
    sweep), the "hidden" a 1x1 ``S -> 3S`` of the position's own state (``state``). The first slice
    is not updated.

    Spacing: the step between slices is ``step`` mm along the swept axis. The learned vector
    ``step_gain`` (3S, initialised to zero) times ``log(step)`` is added to the input-side
    pre-activations ``[r_i, z_i, n_i]``, so the reset, update and candidate of the GRU depend on
    the physical step (a 5 mm step can forget more, or less, than a 0.8 mm step), and a 1 mm step is
    exactly the plain GRU of :class:`SDNCell2d`.

    Initialisation: as :class:`SDNCell2d`, except that the update gate's input bias starts at
    :data:`CARRY_BIAS`, so that a fresh cell carries its neighbours' state along the sweep.

    On a single slice (D = 1), ``"+W"``/``"-W"``/``"+H"``/``"-H"`` equal the 2D directions 0/1/2/3
    of :class:`SDNCell2d` on the ``(B, S, H, W)`` map when ``neighbours.weight[:, :, 1, :]`` is the
    2D ``Conv1d`` kernel (the other kernel rows only see the zero padding).

    Args:
        state_size: ``S``.
        direction: one of :data:`DIRECTIONS`.

    Shapes: ``(B, S, D, H, W)`` -> ``(B, S, D, H, W)``.
    """

    def __init__(self, state_size: int, direction: str):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
        if state_size < 1:
            raise ValueError(f"state_size must be >= 1, got {state_size!r}.")
        self.state_size = state_size
        self.direction = direction
        self.axis = _AXIS[direction[1]]
        self.reverse = direction[0] == "-"
        self.neighbours = nn.Conv2d(state_size, 3 * state_size, 3, padding=1)
        self.state = nn.Conv3d(state_size, 3 * state_size, 1)
        for m in (self.neighbours, self.state):
            _uniform_init(m, state_size)
        with torch.no_grad():
            self.neighbours.bias[state_size : 2 * state_size].fill_(CARRY_BIAS)  # z_i, see CARRY_BIAS
        self.step_gain = nn.Parameter(torch.zeros(3 * state_size))

    def forward(
        self, states: torch.Tensor, log_step_mm: Optional[torch.Tensor] = None, checkpoint: bool = False
    ) -> torch.Tensor:
        """``log_step_mm``: ``(B, 3)`` natural log of the step in mm per spatial axis (D, H, W), or
        None for 1 mm; the cell reads its own axis. ``checkpoint``: recompute the sweep in the
        backward pass instead of keeping every step (only while gradients are enabled)."""
        if states.dim() != 5 or states.shape[1] != self.state_size:
            raise ValueError(
                f"states must be (B, {self.state_size}, D, H, W), got shape {tuple(states.shape)}."
            )
        if log_step_mm is None:
            log_step_mm = states.new_zeros(states.shape[0], 3)
        args = (
            states,
            log_step_mm[:, self.axis],
            self.neighbours.weight,
            self.neighbours.bias,
            self.state.weight,
            self.state.bias,
            self.step_gain,
            self.axis,
            self.reverse,
        )
        if checkpoint and torch.is_grad_enabled():
            return _checkpoint(_sweep3d, *args, use_reentrant=False)
        return _sweep3d(*args)


class SpatialDependency3d(nn.Module):
    """The 3D SDN layer: ``Conv3d(in -> S, kernel_size)`` -> tanh -> sweeps -> ``Conv3d(S -> out, 1)``.

    The sweeps are one :class:`SDNCell3d` per direction, each with its own weights, run one after
    another, each on the output of the previous. Six directions give every position information
    from the whole volume; the cost is ``D + H + W`` sequential steps per direction pair.

    Args:
        in_channels, out_channels: feature channels.
        state_size: ``S``, the GRU state per voxel.
        directions: names from :data:`DIRECTIONS`, in the order they run, or a count (the first
            ``n`` of :data:`DIRECTIONS`); default all 6.
        kernel_size: of the convolution before the sweeps (the original's 3).
        checkpoint: gradient checkpointing per direction while gradients are enabled: the
            sequential steps are recomputed in the backward pass instead of stored.

    Shapes:
        ``x`` ``(B, in_channels, D, H, W)``; ``step_mm`` ``(B, 3)`` or ``(3,)``, the voxel size in mm
        of this feature map per spatial axis (D, H, W), i.e. image spacing x 2^level, or None for
        1 mm; output ``(B, out_channels, D, H, W)``.

    Example::

        >>> layer = SpatialDependency3d(8, 8, state_size=4)
        >>> layer(torch.zeros(2, 8, 3, 5, 9), torch.tensor([[5.0, 0.8, 0.8]] * 2)).shape
        torch.Size([2, 8, 3, 5, 9])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        state_size: int = 16,
        directions: int | Sequence[str] = 6,
        kernel_size: int = 3,
        checkpoint: bool = True,
    ):
        super().__init__()
        self.directions = _parse_directions(directions)
        self.checkpoint = bool(checkpoint)
        self.pre = nn.Conv3d(in_channels, state_size, kernel_size, padding=kernel_size // 2)
        self.cells = nn.ModuleList([SDNCell3d(state_size, d) for d in self.directions])
        self.post = nn.Conv3d(state_size, out_channels, 1)

    def forward(self, x: torch.Tensor, step_mm: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}.")
        return self.forward_log_step(x, _log_step_mm(step_mm, x.shape[0], x))

    def forward_log_step(self, x: torch.Tensor, log_step_mm: torch.Tensor) -> torch.Tensor:
        """As :meth:`forward` with the ``(B, 3)`` natural log of the step in mm, already checked."""
        states = torch.tanh(self.pre(x))
        for cell in self.cells:
            states = cell(states, log_step_mm, checkpoint=self.checkpoint)
        return self.post(states)


class ResSpatialDependency3d(nn.Module):
    """ResSDN: ``sigmoid(g) * conv(x) + (1 - sigmoid(g)) * sdn_out``.

    The :class:`SpatialDependency3d` emits ``2 * out_channels``: ``sdn_out`` and the gate ``g``,
    so each voxel chooses between the local convolution and the long-range recurrence; it trains
    more easily than the bare SDN (the original's ``ResSDN``).

    Args:
        in_channels, out_channels, kernel_size: of the local convolution (and the SDN's first conv).
        state_size, directions, checkpoint: of the :class:`SpatialDependency3d`.

    Shapes: ``x`` ``(B, in_channels, D, H, W)``, ``step_mm`` as in :class:`SpatialDependency3d`;
    output ``(B, out_channels, D, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        state_size: int = 16,
        directions: int | Sequence[str] = 6,
        checkpoint: bool = True,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.sdn = SpatialDependency3d(
            in_channels, 2 * out_channels, state_size, directions, kernel_size, checkpoint
        )

    def forward(self, x: torch.Tensor, step_mm: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}.")
        return self.forward_log_step(x, _log_step_mm(step_mm, x.shape[0], x))

    def forward_log_step(self, x: torch.Tensor, log_step_mm: torch.Tensor) -> torch.Tensor:
        """As :meth:`forward` with the ``(B, 3)`` natural log of the step in mm, already checked."""
        sdn_out, g = self.sdn.forward_log_step(x, log_step_mm).split(self.out_channels, dim=1)
        gate = torch.sigmoid(g)
        return gate * self.conv(x) + (1 - gate) * sdn_out


class _SDNBlock(nn.Module):
    """ResSDN -> ReLU -> InstanceNorm(affine): the SDN in place of a :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, sdn_kwargs: dict):
        super().__init__()
        self.sdn = ResSpatialDependency3d(in_channels, out_channels, kernel_size, **sdn_kwargs)
        self.act = nn.ReLU(inplace=True)
        self.norm = nn.InstanceNorm3d(out_channels, affine=True)

    def forward(self, x: torch.Tensor, log_step_mm: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.sdn.forward_log_step(x, log_step_mm)))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, log_step_mm: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x, log_step_mm) if isinstance(block, _SDNBlock) else block(x)
    return x


class _SDNDownLevel(nn.Module):
    """An encoder level: entry conv (stride 2 below level 0), then ``convs_per_level`` blocks."""

    def __init__(self, layout: UNetLayout, level: int, sdn_kwargs: Optional[dict]):
        super().__init__()
        c, k = layout.channels[level], layout.kernel_size
        c_in = layout.in_channels if level == 0 else layout.channels[level - 1]
        blocks: List[nn.Module] = [ConvBlock(3, c_in, c, k, stride=1 if level == 0 else 2)]
        for i in range(layout.convs_per_level[level]):
            blocks.append(_SDNBlock(c, c, k, sdn_kwargs) if sdn_kwargs is not None and i == 0 else ConvBlock(3, c, c, k))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, log_step_mm: torch.Tensor) -> torch.Tensor:
        return _run_blocks(self.blocks, x, log_step_mm)


class _SDNUpLevel(nn.Module):
    """Transposed conv, crop to the skip, concatenate, then blocks (the second one a ResSDN at an
    SDN level), as :class:`~custom_networks.nets.unet._UpLevel`."""

    def __init__(self, layout: UNetLayout, level: int, sdn_kwargs: Optional[dict]):
        super().__init__()
        c_low, c, k = layout.channels[level + 1], layout.channels[level], layout.kernel_size
        u = layout.up_kernel_size
        self.up = nn.ConvTranspose3d(c_low, c, u, stride=2, padding=(u - 2) // 2)
        blocks: List[nn.Module] = [ConvBlock(3, 2 * c, c, k)]
        for i in range(layout.convs_per_level[level] - 1):
            blocks.append(_SDNBlock(c, c, k, sdn_kwargs) if sdn_kwargs is not None and i == 0 else ConvBlock(3, c, c, k))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, log_step_mm: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        for d in range(2, x.dim()):  # 2 * ceil(n / 2) >= n: crop to the skip's size
            x = x.narrow(d, 0, skip.shape[d])
        return _run_blocks(self.blocks, torch.cat([x, skip], dim=1), log_step_mm)


class SDNUNet(nn.Module):
    """The HyperSpace U-Net with spatial recurrence (SDN U-Net) at its coarse levels.

    The :class:`~custom_networks.nets.layout.UNetLayout` architecture of
    :class:`~custom_networks.nets.unet.PlainUNet`, except that at each level in ``sdn_levels`` the
    second convolution of the level's encoder blocks and of its decoder blocks (the deepest level
    has no decoder) is a ResSDN block (:class:`ResSpatialDependency3d`, the residual-gated variant)
    -> ReLU -> InstanceNorm(affine), following the original's placement Conv -> BN -> ReLU -> SDN ->
    BN -> ReLU in the project's conv -> ReLU -> InstanceNorm convention. The SDN at level ``l`` is
    told its feature map's voxel size, ``spacing * 2**l`` mm per axis. Skips and head are as in
    ``PlainUNet``.

    Args:
        spatial_dims, in_channels, out_channels, channels, convs_per_level, kernel_size,
        up_kernel_size: the fields of :class:`UNetLayout`; ``spatial_dims`` must be 3.
        layout: a ready layout instead of the fields above.
        sdn_levels: level indices with ResSDN blocks; default the levels at 1/4 resolution or
            coarser (index >= 2). A decoder level in it needs ``convs_per_level >= 2``.
        state_size: GRU state per voxel of each SDN layer.
        directions: sweep directions of each SDN layer (see :class:`SpatialDependency3d`).
        checkpoint: gradient checkpointing per sweep direction.

    Shapes:
        ``x`` ``(B, in_channels, D, H, W)``, any spatial size; ``spacing`` ``(B, 3)`` or ``(3,)`` mm per
        spatial axis (D, H, W), or None for 1 mm; output ``(B, out_channels, D, H, W)`` logits.

    Example::

        >>> net = SDNUNet(in_channels=1, out_channels=2, channels=(8, 16, 32), state_size=8)
        >>> net(torch.zeros(1, 1, 9, 20, 17), torch.tensor([2.5, 0.8, 0.8])).shape
        torch.Size([1, 2, 9, 20, 17])
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
        sdn_levels: Optional[Sequence[int]] = None,
        state_size: int = 16,
        directions: int | Sequence[str] = 6,
        checkpoint: bool = True,
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
        if layout.spatial_dims != 3:
            raise ValueError(f"SDNUNet is 3D only: spatial_dims must be 3, got {layout.spatial_dims}.")
        self.layout = layout
        if sdn_levels is None:
            sdn_levels = tuple(range(2, layout.levels))
        sdn_levels = tuple(sorted(set(int(level) for level in sdn_levels)))
        if not sdn_levels:
            raise ValueError(
                f"sdn_levels is empty (the default, levels >= 2, is empty for a {layout.levels}-level "
                "layout): name the levels with SDN blocks, or use PlainUNet."
            )
        bad = [level for level in sdn_levels if not 0 <= level < layout.levels]
        if bad:
            raise ValueError(f"sdn_levels must be in 0..{layout.levels - 1}, got {bad}.")
        for level in sdn_levels:
            if level < layout.levels - 1 and layout.convs_per_level[level] < 2:
                raise ValueError(
                    f"SDN level {level} has a decoder with convs_per_level[{level}] = "
                    f"{layout.convs_per_level[level]} convolution; the SDN replaces the second, so it "
                    "needs >= 2 there (or leave the level out of sdn_levels)."
                )
        self.sdn_levels = sdn_levels
        sdn_kwargs = dict(state_size=state_size, directions=directions, checkpoint=checkpoint)
        self.down = nn.ModuleList(
            [_SDNDownLevel(layout, level, sdn_kwargs if level in sdn_levels else None) for level in range(layout.levels)]
        )
        self.up = nn.ModuleList(
            [
                _SDNUpLevel(layout, level, sdn_kwargs if level in sdn_levels else None)
                for level in reversed(range(layout.levels - 1))
            ]
        )
        k = layout.kernel_size
        self.head = nn.Conv3d(layout.channels[0], layout.out_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor, spacing: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, D, H, W), got shape {tuple(x.shape)}.")
        log_spacing = _log_step_mm(spacing, x.shape[0], x, name="spacing")
        skips: List[torch.Tensor] = []
        for level, down in enumerate(self.down):
            x = down(x, log_spacing + level * math.log(2.0))  # voxel size spacing * 2**level
            skips.append(x)
        for i, up in enumerate(self.up):
            level = len(skips) - 2 - i
            x = up(x, skips[level], log_spacing + level * math.log(2.0))
        return self.head(x)
