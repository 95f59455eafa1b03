"""The inference engine: compiled + bucketed forward equal to the eager network, weights generated
once per spacing, one compilation per shape bucket, clean fallback to eager.

The compiled path is exercised with the ``aot_eager`` backend (the same tracing, functionalisation
and bucketing as ``inductor``, without a C++ compiler, in seconds on a CPU)."""

from __future__ import annotations

import logging

import pytest
import torch

from custom_networks import HyperUNet, PlainUNet, SpacingSlidingWindowInferer
from custom_networks.pipeline.compiled import UNetEngine, bucket_shape

SPACINGS = ([1.0, 1.0, 3.0], [2.0, 2.0, 2.0])


@pytest.fixture
def net():
    torch.manual_seed(0)
    return HyperUNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32), convs_per_level=1).eval()


def test_bucket_shape_rounds_up_per_axis():
    assert bucket_shape((30, 33, 17), 16) == (32, 48, 32)
    assert bucket_shape((32, 48, 32), 16) == (32, 48, 32)


@pytest.mark.parametrize("shape", [(30, 33, 17), (32, 32, 16)])
def test_compiled_bucketed_forward_equals_the_eager_network(net, shape):
    """Padding to the bucket (48 x 48 x 32 for 30 x 33 x 17) is removed exactly: the masked
    InstanceNorm and zeroed padding reproduce the unpadded forward."""
    engine = UNetEngine(net, compile=True, backend="aot_eager")
    x = torch.randn(2, 1, *shape)
    for spacing in SPACINGS:
        s = torch.tensor([spacing] * 2)
        with torch.no_grad():
            expected, got = net(x, s), engine(x, s)
        assert got.shape == expected.shape == (2, 3, *shape)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert engine.compiling


def test_one_compilation_per_bucket_not_per_size(net):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    engine = UNetEngine(net, compile=True, backend="aot_eager")
    with torch.no_grad():
        for shape in [(30, 33, 17), (32, 40, 20), (17, 47, 31)]:  # all in the bucket 32 x 48 x 32
            for spacing in SPACINGS:
                engine(torch.randn(1, 1, *shape), torch.tensor([spacing]))
        graphs_one_bucket = counters["stats"]["unique_graphs"]
        engine(torch.randn(1, 1, 40, 40, 40), torch.tensor([SPACINGS[0]]))  # bucket 48 x 48 x 48
    assert graphs_one_bucket == 1
    assert counters["stats"]["unique_graphs"] == 2


def test_weights_are_generated_once_per_spacing_and_again_after_new_weights(net):
    engine = UNetEngine(net, compile=False)
    x = torch.randn(1, 1, 24, 24, 16)
    with torch.no_grad():
        first = engine(x, torch.tensor([SPACINGS[0]]))
        for _ in range(3):
            engine(x, torch.tensor([SPACINGS[0]]))
        assert net.generation_count == 1  # cache hits do not call the hypernetwork
        engine(x, torch.tensor([SPACINGS[1]]))
        assert net.generation_count == 2
        # a checkpoint loaded into the network is picked up
        state = {k: v + 0.01 for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        changed = engine(x, torch.tensor([SPACINGS[0]]))
    assert net.generation_count == 3
    assert not torch.allclose(first, changed)


def test_failed_compilation_falls_back_to_eager_with_the_same_numbers(net, caplog):
    engine = UNetEngine(net, compile=True, backend="no_such_backend")
    x, s = torch.randn(1, 1, 30, 33, 17), torch.tensor([SPACINGS[0]])
    with caplog.at_level(logging.WARNING), torch.no_grad():
        got = engine(x, s)
        expected = net(x, s)
    assert "running this shape eagerly" in caplog.text
    torch.testing.assert_close(got, expected)
    # that bucket runs eagerly from now on, without trying again; the others still try
    assert engine._failed_buckets == {(32, 48, 32)}
    caplog.clear()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        torch.testing.assert_close(engine(x, s), expected)
    assert "torch.compile failed" not in caplog.text


def test_auto_compiles_only_on_cuda(net):
    engine = UNetEngine(net)  # compile="auto"
    with torch.no_grad():
        engine(torch.randn(1, 1, 16, 16, 16), torch.tensor([SPACINGS[0]]))
    assert engine._compiled is None  # on the CPU: the eager forward, nothing compiled


def test_mixed_spacings_and_training_mode_and_plain_unets(net):
    x = torch.randn(3, 1, 24, 24, 16)
    s = torch.tensor([SPACINGS[0], SPACINGS[1], SPACINGS[0]])
    engine = UNetEngine(net, compile=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(engine(x, s), net(x, s), atol=1e-4, rtol=1e-4)
    # with gradients (training), the network itself runs
    net.train()
    out = engine(x, s)
    assert out.requires_grad
    net.eval()
    plain = PlainUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16), convs_per_level=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(UNetEngine(plain, compile=True, backend="aot_eager")(x[:, :, :23]), plain(x[:, :, :23]), atol=1e-4, rtol=1e-4)


def test_engine_in_the_sliding_window_inferer(net):
    inferer = SpacingSlidingWindowInferer(roi_size=(32, 32, 32), sw_batch_size=2, overlap=0.25)
    x = torch.randn(1, 1, 50, 41, 20)
    s = torch.tensor([SPACINGS[1]])
    with torch.no_grad():
        torch.testing.assert_close(inferer(x, UNetEngine(net, compile=True, backend="aot_eager"), spacing=s), inferer(x, net, spacing=s), atol=1e-4, rtol=1e-4)


def test_bad_options_are_refused(net):
    with pytest.raises(ValueError, match="compile"):
        UNetEngine(net, compile="sometimes")
    assert UNetEngine(net, compile="false").compile_mode is False  # as the bundle command line gives it
    assert UNetEngine(net, compile="True").compile_mode is True
    with pytest.raises(ValueError, match="bucket"):
        UNetEngine(net, bucket=0)


def test_compile_network_for_training_keeps_checkpoint_keys_and_numbers(net):
    from custom_networks.pipeline.compiled import compile_network

    x, s = torch.randn(2, 1, 16, 16, 16), torch.tensor([SPACINGS[0]] * 2)
    net.train()
    expected = net(x, s)
    keys = list(net.state_dict())
    assert compile_network(net, "false") is net and net._compiled_call_impl is None  # "--compile false"
    compiled = compile_network(net, True, backend="aot_eager")
    assert net._compiled_call_impl is not None
    assert compiled is net and list(net.state_dict()) == keys  # checkpoints load into an uncompiled network
    torch.testing.assert_close(net(x, s), expected, atol=1e-4, rtol=1e-4)
    net(x, s).sum().backward()
    assert all(p.grad is not None for p in net.heads.parameters())
