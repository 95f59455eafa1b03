"""The one place that turns a bundle's network choice into a module.

A bundle config chooses the primary network (``"primary_network": "unet" | "sdn_unet"``) and
whether the hypernetwork generates its weights (``"hypernetwork": true`` for HyperSpace, ``false``
for the FS / FSNR / AS baselines); everything else (channels, classes) is the data set's.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .hypernetwork import HyperNetwork
from .hyperspace import HyperUNet
from .sdn import SDNUNet
from .unet import PlainUNet

__all__ = ["PRIMARY_NETWORKS", "build_network", "describe_network", "matches_state_dict", "primary_network_of"]

# name -> primary network class; both take the UNetLayout fields (and the SDN its own options)
PRIMARY_NETWORKS: dict[str, type[nn.Module]] = {"unet": PlainUNet, "sdn_unet": SDNUNet}


def _primary_class(primary: str) -> type[nn.Module]:
    key = str(primary).strip().lower()
    if key not in PRIMARY_NETWORKS:
        raise ValueError(f"primary_network {primary!r} is not one of {', '.join(PRIMARY_NETWORKS)}.")
    return PRIMARY_NETWORKS[key]


def build_network(
    primary: str = "unet",
    hypernetwork: bool = True,
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    channels: Sequence[int] = (16, 32, 64, 128),
    hidden_features: Sequence[int] = (10, 10, 50),
    primary_kwargs: Mapping | None = None,
    **hyper_kwargs,
) -> nn.Module:
    """The network of a bundle.

    Args:
        primary: a key of :data:`PRIMARY_NETWORKS`.
        hypernetwork: generate the primary network's weights from the spacing (HyperSpace), or
            train them directly (the baselines).
        spatial_dims, in_channels, out_channels, channels: the primary network's layout.
        hidden_features: widths of the spacing MLP (HyperSpace only).
        primary_kwargs: further arguments of the primary network (e.g. ``state_size`` of the SDN).
        hyper_kwargs: further arguments of the hypernetwork (``output_scale``, ``cache_size``, ...).

    Returns:
        ``HyperUNet`` (unet + hypernetwork: the paper's network, loading its earlier checkpoints),
        ``HyperNetwork(SDNUNet)`` ("HyperSpace SDN"), or the plain primary network.
    """
    cls = _primary_class(primary)
    layout = dict(spatial_dims=int(spatial_dims), in_channels=int(in_channels), out_channels=int(out_channels), channels=tuple(channels))
    extra = dict(primary_kwargs or {})
    if not hypernetwork:
        if hyper_kwargs:
            raise ValueError(f"{sorted(hyper_kwargs)} are hypernetwork options, but hypernetwork is false.")
        return cls(**layout, **extra)
    if cls is PlainUNet and not extra:
        return HyperUNet(**layout, hidden_features=tuple(hidden_features), **hyper_kwargs)
    return HyperNetwork(cls(**layout, **extra), spatial_dims=int(spatial_dims), hidden_features=tuple(hidden_features), **hyper_kwargs)


def describe_network(primary: str = "unet", hypernetwork: bool = True) -> str:
    """A line for a bundle's metadata, e.g. ``"HyperSpace: UNet (unet) weights generated from the spacing"``."""
    cls = _primary_class(primary)
    if hypernetwork:
        return f"HyperSpace: {cls.__name__} ({primary}) with all weights generated from the voxel spacing by a hypernetwork"
    return f"{cls.__name__} ({primary}) with trained weights (baseline, no hypernetwork)"


def matches_state_dict(network: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` has exactly ``network``'s keys and shapes (it loads without error)."""
    own = network.state_dict()
    return set(own) == set(state_dict) and all(tuple(own[k].shape) == tuple(state_dict[k].shape) for k in own)


def primary_network_of(state_dict: Mapping[str, torch.Tensor], build: Callable[[str], nn.Module]) -> str | None:
    """The key of :data:`PRIMARY_NETWORKS` whose network ``build(key)`` has ``state_dict``'s keys
    and shapes, or None. ``build`` is called on the meta device (the structure only: no memory,
    no initialisation cost); it is e.g. a bundle config with ``primary_network`` overridden.

    A bundle trained with ``--primary_network sdn_unet`` leaves a checkpoint of that network while
    its config still says ``unet``: the app and :func:`~custom_networks.bundle_tools.pack` read
    the choice off the checkpoint with this.
    """
    for key in PRIMARY_NETWORKS:
        with torch.device("meta"):
            network = build(key)
        if matches_state_dict(network, state_dict):
            return key
    return None
