"""Fixtures shared by several test files."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the tests' own helpers


@pytest.fixture(scope="session")
def size_task_hyperunet(tmp_path_factory):
    """A HyperUNet trained on the size task as ``test_learning.py`` trains it (seed 0), once per
    session: the learning test and the spacing-ensemble learning test use the same model.

    Returns ``(network in eval mode, best validation Dice)``; users must not train it further.
    """
    from test_learning import LAYOUT, train

    from custom_networks import HyperUNet

    torch.manual_seed(0)
    net = HyperUNet(**LAYOUT)
    best = train(net, tmp_path_factory.mktemp("size_task_hyperunet"))
    return net.eval(), best
