"""Self-supervised pre-training of a member on the unlabelled catalogue (masked-input reconstruction).

A label survey labels a few thousand stars; the catalogue the model will label holds 4-5 times as many
spectra with XP and photometry, unlabelled. Before its supervised training, a member can learn from
those the structure of its inputs: each star's inputs are corrupted (a contiguous span of the spectrum
masked as preprocess masks bad pixels, whole XP / BP / RP / parallax blocks blanked as preprocess blanks
missing ones) and the network's fused features (the last hidden layer of the head, the same features
the label outputs read) must reconstruct the uncorrupted inputs through a linear decoder: the spectrum
(binned), the XP coefficients and the scalar features. Features that predict one input block from the
others (colours from XP, line strengths from XP and photometry) are the ones that carry Teff, log g
and metallicity. The decoder is discarded; supervised training then starts from these weights.

``ModelConfig.pretrain_epochs`` (0: off) sets the epochs; the hybrid preset's default and what it was
measured to gain and cost are in the README ("Self-supervised pre-training").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stellar.ensemble import input_dims
from stellar.inference_core import INPUTS
from stellar.loader import FeatureDataset
from stellar.trust import drop_blocks

PRETRAIN_SPLIT = "observed"  # the catalogue stars without a usable label: never trained or evaluated on
SPECTRUM_BIN = 4  # the reconstructed spectrum is binned by this many pixels (the detail is noise)
CORRUPT_BLOCKS = {"xp": 0.15, "bp": 0.15, "rp": 0.15, "parallax": 0.15}


def _targets(b: dict, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) reconstruction targets and their (B, T) weights: the binned spectrum (flux - 1 over the
    unmasked pixels, scaled to unit typical size), the normalised XP and scalar features."""
    flux, mask = b["spectrum"], b["spectrum_mask"]
    keep = (~mask).to(flux.dtype)
    n = (flux.shape[1] // SPECTRUM_BIN) * SPECTRUM_BIN
    fsum = ((flux[:, :n] - 1.0) * keep[:, :n]).reshape(len(flux), -1, SPECTRUM_BIN).sum(2)
    cnt = keep[:, :n].reshape(len(flux), -1, SPECTRUM_BIN).sum(2)
    spec = torch.where(cnt > 0, fsum / cnt.clamp(min=1), torch.zeros_like(fsum)) / 0.05
    w_spec = (cnt > 0).to(flux.dtype) / spec.shape[1]
    xp, sc = b["xp"], b["scalars"]
    target = torch.cat([spec, xp, sc], dim=1)
    weight = torch.cat([w_spec, torch.full_like(xp, 1.0 / xp.shape[1]), torch.full_like(sc, 1.0 / sc.shape[1])], dim=1)
    return target.to(dev), weight.to(dev)


def _mask_span(mask: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """A copy of ``mask`` with one random contiguous span of ``fraction`` of the pixels masked per star."""
    b, p = mask.shape
    width = max(1, int(round(fraction * p)))
    start = torch.randint(0, p - width + 1, (b,), generator=gen)
    idx = torch.arange(p)[None, :]
    return mask | ((idx >= start[:, None]) & (idx < start[:, None] + width))


def pretrain(net: nn.Module, features_root: str, stats: dict, epochs: int, batch_size: int, learning_rate: float,
             seed: int, dev, span: float = 0.3, on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``net``'s branches and head in place on masked-input reconstruction over the unlabelled split
    for ``epochs`` epochs; returns each epoch's mean loss (empty when the split holds no star: every
    catalogue star labelled leaves nothing to pre-train on, and the weights are left as initialised).
    ``on_epoch(epoch, loss)`` is called after each epoch (the progress line). Deterministic for a given
    ``seed``."""
    data = FeatureDataset(features_root, split=PRETRAIN_SPLIT, batch_size=batch_size, shuffle=True,
                          seed=seed + 31, stats=stats)
    gen = torch.Generator().manual_seed(seed + 15485863)
    n_pix, n_xp, n_sc = input_dims(stats)
    decoder = nn.Linear(net.out.in_features, n_pix // SPECTRUM_BIN + n_xp + n_sc).to(dev)
    opt = torch.optim.Adam([*net.parameters(), *decoder.parameters()], lr=learning_rate)
    losses = []
    for epoch in range(epochs):
        data.set_epoch(epoch)
        net.train()
        total, count = 0.0, 0
        for b in data:
            target, weight = _targets(b, dev)
            xp, sc = b["xp"].clone(), b["scalars"].clone()
            drop_blocks(xp, sc, CORRUPT_BLOCKS, stats, gen)
            # the network zeroes masked pixels itself: masking the span is the whole corruption
            inputs = dict(b, spectrum_mask=_mask_span(b["spectrum_mask"], span, gen), xp=xp, scalars=sc)
            h = net.fused_features(*(inputs[k].to(dev) for k in INPUTS))
            loss = (weight * (decoder(h) - target) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(target)
            count += len(target)
        if count == 0:  # no unlabelled star: nothing to learn from
            return []
        losses.append(total / count)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses
