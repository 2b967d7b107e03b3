"""The stacked ensemble (all members as one channels-last network) against the members one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stellar.inference_core import forward_members
from stellar.model import StackedEnsemble
from stellar.model import HybridNet, load_model_preset


@pytest.mark.parametrize("preset,activation", [("hybrid", None), ("hybrid", "gelu"), ("rave2020", None),
                                               ("gaia_eso2023", "relu")])
def test_stacked_equals_members(preset, activation):
    cfg = load_model_preset(preset)
    # odd pools and an odd length exercise the pooling remainder; gelu is not monotonic, so it
    # must run before the pool
    conv = [c.model_copy(update={"pool": p}) for c, p in zip(cfg.conv, (3, 2, 1))]
    cfg = cfg.model_copy(update={"conv": conv, **({"activation": activation} if activation else {})})
    nets = []
    for i in range(4):
        torch.manual_seed(i)
        nets.append(HybridNet(cfg, 801, 110, 6, 5).eval())
    g = torch.Generator().manual_seed(7)
    data = {"spectrum": 1 + 3 * torch.randn(300, 801, generator=g),  # wide: reaches the gelu dip
            "spectrum_mask": torch.rand(300, 801, generator=g) < 0.05,
            "xp": torch.randn(300, 110, generator=g), "scalars": torch.randn(300, 6, generator=g)}
    ref_m, ref_v = forward_members(nets, data, torch.device("cpu"), 64)
    m, v = forward_members(StackedEnsemble(nets).eval(), data, torch.device("cpu"), 64)
    assert m.shape == ref_m.shape == (4, 300, 5)
    np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-5 * np.abs(ref_m).max())
    np.testing.assert_allclose(v, ref_v, rtol=1e-4)
    assert not np.allclose(m[0], m[1])  # members differ, so a mixed-up member order would fail


@pytest.mark.parametrize("preset,activation", [("hybrid", None), ("hybrid", "gelu"), ("rave2020", None),
                                               ("gaia_eso2023", "relu")])
def test_channels_last_training_path_equals_the_conv_modules(preset, activation):
    """HybridNet's CPU conv stack (channels-last) against its own (B, C, L) modules: the same outputs
    and the same gradients, for every preset, with odd pools and an odd length."""
    cfg = load_model_preset(preset)
    conv = [c.model_copy(update={"pool": p}) for c, p in zip(cfg.conv, (3, 2, 1))]
    cfg = cfg.model_copy(update={"conv": conv, **({"activation": activation} if activation else {})})
    torch.manual_seed(0)
    net = HybridNet(cfg, 801, 110, 6, 5).train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 801, 2, generator=g, dtype=torch.float64).float() * 3
    x.requires_grad_(True)
    weights = [m.weight for m in net.conv if isinstance(m, torch.nn.Conv1d)]
    outs, grads = [], []
    for path in (lambda t: net.conv(t.transpose(1, 2)).flatten(1), net._conv_channels_last):
        out = path(x)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))  # a loss that weighs each output
        gr = torch.autograd.grad((out * w).sum(), [x, *weights])
        outs.append(out.detach())
        grads.append(gr)
    assert outs[0].shape == outs[1].shape
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * float(outs[0].abs().max()))
    for a, b in zip(grads[0], grads[1]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    # the dropout sits after the flatten, so both layouts draw the same mask for the same seed
    assert isinstance(net.conv_dropout, torch.nn.Dropout) and not any(
        isinstance(m, torch.nn.Dropout) for m in net.conv)
