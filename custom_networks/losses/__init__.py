"""Losses MONAI lacks: SPOCKMIP's maximum-intensity-projection loss for vessel continuity, and the
focal Tversky loss. A layer beside ``nets``: it imports only ``custom_networks.spacing``, MONAI and torch."""

from .build import VOXEL_LOSSES, build_loss
from .mip import MIP_AXES, MIPLoss, VoxelMIPLoss, project
from .tversky import FocalTverskyLoss

__all__ = ["MIP_AXES", "VOXEL_LOSSES", "FocalTverskyLoss", "MIPLoss", "VoxelMIPLoss", "build_loss", "project"]
