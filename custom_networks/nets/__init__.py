"""The networks: one :class:`UNetLayout` builds the plain UNet, the SDN U-Net and the hypernetwork
that generates their weights; :func:`build_network` is the bundles' one entry point."""

from .layout import UNetLayout
from .unet import PlainUNet
from .hypernetwork import HyperNetwork
from .hyperspace import HyperUNet
from .sdn import SDNUNet
from .build import PRIMARY_NETWORKS, build_network, describe_network

__all__ = ["HyperNetwork", "HyperUNet", "PRIMARY_NETWORKS", "PlainUNet", "SDNUNet", "UNetLayout", "build_network", "describe_network"]
