"""The networks: one :class:`UNetLayout` builds the plain UNet and the hypernetwork that generates its weights."""

from .layout import UNetLayout
from .unet import PlainUNet
from .hypernetwork import HyperNetwork
from .hyperspace import HyperUNet

__all__ = ["HyperNetwork", "HyperUNet", "PlainUNet", "UNetLayout"]
