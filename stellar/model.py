"""The hybrid network: a mask-aware 1-D CNN on the spectrum, dense branches for XP and
astrometry/photometry, and a head that outputs a mean and a log-variance per label.

Architectures are data (``ModelConfig``), so the reference networks of the
same group (RAVE 2020, Gaia-ESO 2023) and the default hybrid are presets
under ``conf/models/``, and a spectrum-only instrument switches branches off.

``StackedEnsemble`` is the same network for all members of an ensemble at once (what predict runs).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from stellar.config import StrictModel, load_preset


class ConvLayer(StrictModel):
    """One convolution layer of the spectrum branch: filters, kernel width and max-pool size (1: none)."""

    filters: int = Field(gt=0)
    kernel: int = Field(gt=0)
    pool: int = Field(1, ge=1)


class ModelConfig(StrictModel):
    """A network and its training settings (a preset under ``conf/models/``): branches, layer widths,
    activation, output bounds, block dropout, optimiser, early stopping and label balancing."""

    name: str = "hybrid"
    use_spectrum: bool = True
    use_xp: bool = True
    use_scalars: bool = True
    conv: list[ConvLayer] = Field(default_factory=lambda: [ConvLayer(filters=8, kernel=10, pool=2),
                                                           ConvLayer(filters=8, kernel=10, pool=2),
                                                           ConvLayer(filters=4, kernel=10, pool=1)])
    spectrum_dense: list[int] = Field(default_factory=lambda: [64])
    xp_dense: list[int] = Field(default_factory=lambda: [64, 32])
    scalar_dense: list[int] = Field(default_factory=lambda: [27])
    head: list[int] = Field(default_factory=lambda: [64, 32])
    dropout: float = Field(0.2, ge=0, lt=1)  # on the flattened conv features (and the head: head_dropout)
    # Dropout in the fused head's layers; None: ``dropout``. The head carries the scalar features, and
    # dropout there trains the network on randomly dimmed parallax/photometry features, which pulls the
    # labels they pin toward the training mean (attenuation bias): at 0.1 the demo's dwarfs with log g
    # 4.6-5.0 came out 0.13 dex low with a scatter of 0.02, training stars included. 0.03 (with 0.2 on
    # the conv features, 5 members) cut log g RMSE 18-38 % and Teff 4-18 %, the abundances lower or
    # equal, on both surveys (README, "Head dropout").
    head_dropout: float | None = Field(0.03, ge=0, lt=1)
    activation: Literal["leaky_relu", "relu", "gelu"] = "leaky_relu"
    heteroscedastic: bool = True  # mean + log-variance per label (else mean only, MSE)
    # Bounded means (stellar.trust.bound_outputs): the training labels' range plus this fraction of it on
    # each side (never past the physical envelope) is the most any input can make the network say.
    output_margin: float = Field(0.25, gt=0, le=5)
    # Training augmentation: the probability that a star's whole input block (xp, bp, rp, parallax) is
    # blanked as preprocess blanks a missing one, so stars without it get honest predictions. BP is
    # blanked more often: it is the block faint and red stars lose most, and the one whose absence
    # costs the abundances most. 5 % left no-BP stars 1.40-1.58x the others' RMSE in [M/H], [alpha/M] and
    # [Fe/H] (demo and hard surveys); 15 % gives 1.17-1.41x, with the others' RMSE within -8 % / +8 %
    # per label; 25 % is the default since the head dropout went to 0.03 (README, "Missing inputs").
    input_dropout: dict[str, float] = Field(default_factory=lambda: {"xp": 0.02, "bp": 0.25, "rp": 0.02,
                                                                     "parallax": 0.02})
    # S/N augmentation (stellar.augment): the probability that a training star's spectrum is, in a given
    # batch, made noisier to an S/N drawn from the whole catalogue's S/N distribution (left as it is
    # where its own S/N is already lower). A label survey's stars are mostly brighter than the catalogue's;
    # this shows the network spectra as noisy as the ones it will label. 0: off.
    snr_augment: float = Field(0.0, ge=0, le=1)
    # training
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # L2
    batch_size: int = Field(128, gt=0)
    max_epochs: int = Field(150, gt=0)  # a bound; early stopping ends training
    # Epochs without a new best validation loss before a member stops. The validation NLL swings by
    # 0.05-0.1 from epoch to epoch (constant-rate Adam), more than its trend late in training, and Teff and
    # log g reach their own best 10-40 epochs after the summed loss first stalls for 12: 25 (against 12;
    # hard survey, 4 members) lowered every label's RMSE by 0-7 % at 1.34x the training time.
    patience: int = Field(25, gt=0)
    # Learning-rate decay on a plateau (torch ReduceLROnPlateau on the validation NLL): after
    # ``lr_patience`` epochs without a new best, the rate is multiplied by ``lr_factor`` (1: off, the
    # constant rate). With Adam's constant rate the weights keep rattling around the loss valley's floor;
    # a smaller step late in training settles them. Set lr_patience below ``patience`` or it never acts.
    lr_factor: float = Field(1.0, gt=0, le=1)
    lr_patience: int = Field(4, ge=0)
    # Label balancing (stellar.balance): each training star's loss weight is (local label density /
    # median density) ** -label_balance, capped at label_balance_cap and normalised to mean 1. A
    # magnitude-limited label set is dense near solar metallicity; unweighted, the network's optimum
    # at low S/N is pulled toward that peak (metal-poor stars come out too metal-rich). 0 = off.
    label_balance: float = Field(0.0, ge=0, le=1)
    label_balance_cap: float = Field(5.0, ge=1, le=100)
    # Covariate-shift weights (stellar.shift): each training star's loss weight is the density ratio
    # catalogue / training set at its observables (colours, luminosity, magnitude, S/N) to this power,
    # capped at catalogue_weight_cap, so the weighted training set has the mix of the stars the model
    # will label (label surveys favour giants and bright stars). 0 = off.
    catalogue_weight: float = Field(0.0, ge=0, le=1)
    catalogue_weight_cap: float = Field(5.0, ge=1, le=100)
    # Exponential moving average of the weights, per optimiser step (0: off). Validation, early stopping and
    # the saved member use the averaged weights, which follow the loss valley's floor instead of the last
    # step's noise (e.g. 0.999: an average over the last ~1000 steps).
    weight_average: float = Field(0.0, ge=0, lt=1)
    # Branch heads (gradient blending, Wang et al. 2020): a linear mean/log-variance head on each input
    # branch's own features, trained beside the joint head with this weight on their mean NLL (0: off).
    # Trained jointly, a multimodal network leans on the branch that is quickest to fit (here the
    # spectrum) and leaves the others under-used; a loss on each branch alone makes every branch carry
    # what its input holds. Training only: prediction uses the joint head, so inference costs nothing more.
    branch_loss: float = Field(0.0, ge=0, le=10)
    # beta-NLL (Seitzer et al. 2022; stellar.model.gaussian_nll): the training loss's terms weighted by their
    # variance ** nll_beta (gradient stopped), so labels the network is unsure of still pull the means.
    # Validation, early stopping and the calibration use the plain NLL. 0: the plain NLL.
    nll_beta: float = Field(0.0, ge=0, le=1)
    # Self-supervised pre-training (stellar.pretrain): epochs of masked-input reconstruction on the unlabelled
    # catalogue stars before the supervised training (0: off), and the share of the spectrum each star has
    # masked as one contiguous span during it.
    pretrain_epochs: int = Field(0, ge=0, le=500)
    pretrain_span: float = Field(0.3, gt=0, lt=1)

    def model_post_init(self, _ctx) -> None:
        """Refuse an architecture without an input branch, and input dropout of unknown blocks or at rates
        outside [0, 0.5]."""
        if not (self.use_spectrum or self.use_xp or self.use_scalars):
            raise ValueError("at least one input branch must be on")
        blocks = ("xp", "bp", "rp", "parallax")
        bad = [k for k in self.input_dropout if k not in blocks]
        if bad:
            raise ValueError(f"input_dropout: unknown blocks {bad}; known: {list(blocks)}")
        wrong = {k: v for k, v in self.input_dropout.items() if not 0.0 <= v <= 0.5}
        if wrong:
            raise ValueError(f"input_dropout: rates must lie in [0, 0.5], got {wrong}")


def load_model_preset(name: str, conf_dir: str | None = None) -> ModelConfig:
    """Load and validate a model preset by name (hybrid, rave2020, gaia_eso2023) or YAML path."""
    return load_preset("models", name, ModelConfig, conf_dir, "model")


def activation(name: str) -> nn.Module:
    """The activation module of a preset's ``activation`` name."""
    return {"leaky_relu": nn.LeakyReLU(0.01), "relu": nn.ReLU(), "gelu": nn.GELU()}[name]


def _mlp(n_in: int, widths: list[int], act: str, dropout: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(n_in, w), activation(act)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        n_in = w
    return nn.Sequential(*layers), n_in


class HybridNet(nn.Module):
    """Inputs: spectrum (B, P) continuum-normalised, mask (B, P) bool, xp (B, X), scalars (B, S).

    Outputs: mean (B, L) and log-variance (B, L) of the normalised labels. With ``bounds``
    (``stellar.trust.label_bounds``, normalised units) the mean is bounded by
    ``stellar.trust.bound_outputs``; the bounds are buffers derived from the normalisation
    statistics, not saved in the state dict, so they always match the statistics the model ships with.
    """

    cpu_channels_last = True  # the conv stack's CPU layout (False: the (B, C, L) modules, as on GPU)

    def __init__(self, cfg: ModelConfig, n_pixels: int, n_xp: int, n_scalars: int, n_labels: int,
                 bounds: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_labels = n_labels
        self.bounded = bounds is not None
        for key in ("lo", "hi", "m_lo", "m_hi"):
            value = torch.as_tensor(bounds[key], dtype=torch.float32) if bounds is not None else torch.zeros(n_labels)
            self.register_buffer(f"bound_{key}", value, persistent=False)
        width, branch_widths = 0, []
        if cfg.use_spectrum:
            convs: list[nn.Module] = []
            ch, length = 2, n_pixels  # channels: flux - 1 (0 where masked), mask
            for layer in cfg.conv:
                convs += [nn.Conv1d(ch, layer.filters, layer.kernel), activation(cfg.activation)]
                length = length - layer.kernel + 1
                if layer.pool > 1:
                    convs.append(nn.MaxPool1d(layer.pool))
                    length //= layer.pool
                ch = layer.filters
            self.conv = nn.Sequential(*convs)
            # on the flattened output: the same dropout mask whichever layout the convs ran in
            self.conv_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
            self.spec_dense, w = _mlp(ch * length, cfg.spectrum_dense, cfg.activation, 0.0)
            width += w
            branch_widths.append(w)
        if cfg.use_xp:
            self.xp_dense, w = _mlp(n_xp, cfg.xp_dense, cfg.activation, 0.0)
            width += w
            branch_widths.append(w)
        if cfg.use_scalars:
            self.scalar_dense, w = _mlp(n_scalars, cfg.scalar_dense, cfg.activation, 0.0)
            width += w
            branch_widths.append(w)
        self.head, w = _mlp(width, cfg.head, cfg.activation,
                            cfg.dropout if cfg.head_dropout is None else cfg.head_dropout)
        n_out = n_labels * (2 if cfg.heteroscedastic else 1)
        self.out = nn.Linear(w, n_out)
        # training-only heads on each branch alone (ModelConfig.branch_loss); saved with the weights
        self.branch_heads = (nn.ModuleList(nn.Linear(bw, n_out) for bw in branch_widths)
                             if cfg.branch_loss > 0 else None)

    def forward(self, spectrum: torch.Tensor, mask: torch.Tensor, xp: torch.Tensor,
                scalars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means (bounded where the net has bounds) and log-variances of the normalised labels, (B, L) each.

        On CPU the conv stack runs in the faster channels-last layout (:meth:`_conv_channels_last`), on
        other devices as the (B, C, L) modules: same weights, same result. Without ``heteroscedastic`` the
        log-variance is 0."""
        return self._joint(self._branches(spectrum, mask, xp, scalars))

    def forward_with_branches(self, spectrum: torch.Tensor, mask: torch.Tensor, xp: torch.Tensor,
                              scalars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """:meth:`forward`'s (mean, log-variance) plus each branch head's own (mean, log-variance), for the
        training loss of ``ModelConfig.branch_loss`` (an empty list without branch heads)."""
        parts = self._branches(spectrum, mask, xp, scalars)
        heads = self.branch_heads if self.branch_heads is not None else []
        return (*self._joint(parts), [self._outputs(head(part)) for head, part in zip(heads, parts)])

    def fused_features(self, spectrum: torch.Tensor, mask: torch.Tensor, xp: torch.Tensor,
                       scalars: torch.Tensor) -> torch.Tensor:
        """The head's last hidden layer, (B, width): the features the label outputs are a linear function of
        (what self-supervised pre-training, stellar.pretrain, reconstructs the inputs from)."""
        return self.head(torch.cat(self._branches(spectrum, mask, xp, scalars), dim=1))

    def _joint(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The joint head on the branches' features: bounded mean and log-variance."""
        return self._outputs(self.out(self.head(torch.cat(parts, dim=1))))

    def _branches(self, spectrum, mask, xp, scalars) -> list[torch.Tensor]:
        """Each input branch's features, (B, width) each, in the order spectrum, XP, scalars."""
        parts = []
        if self.cfg.use_spectrum:
            keep = (~mask).to(spectrum.dtype)
            if self.cpu_channels_last and spectrum.device.type == "cpu":
                h = self._conv_channels_last(torch.stack([(spectrum - 1.0) * keep, 1.0 - keep], dim=2))
            else:
                h = self.conv(torch.stack([(spectrum - 1.0) * keep, 1.0 - keep], dim=1)).flatten(1)
            parts.append(self.spec_dense(self.conv_dropout(h)))
        if self.cfg.use_xp:
            parts.append(self.xp_dense(xp))
        if self.cfg.use_scalars:
            parts.append(self.scalar_dense(scalars))
        return parts

    def _outputs(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer's values as the bounded mean and clamped log-variance."""
        if self.cfg.heteroscedastic:
            mean, log_var = out[:, : self.n_labels], out[:, self.n_labels :].clamp(-12.0, 8.0)
        else:
            mean, log_var = out, torch.zeros_like(out)
        return self.bound(mean), log_var

    def bound(self, mean: torch.Tensor) -> torch.Tensor:
        """The bounded mean (identity where the net has no bounds)."""
        if not self.bounded:
            return mean
        from stellar.trust import bound_outputs

        return bound_outputs(mean, self.bound_lo, self.bound_hi, self.bound_m_lo, self.bound_m_hi)

    def _conv_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The conv stack on CPU: x (B, L, C) as the channels-last storage of (B, C, 1, L), each 1-D
        layer a height-1 2-D one. oneDNN's kernels in this layout, forward and backward, and its
        channels-last max-pool (MaxPool1d's was a quarter of a step) make a training step about 1.7x
        and an epoch 1.3x faster than the (B, C, L) modules (1 thread, batch 128; benchmarks/training.py).
        Same weights and arithmetic, flattened in the modules' (C, L) order."""
        x = x.unsqueeze(1).permute(0, 3, 1, 2)
        for mod in self.conv:
            if isinstance(mod, nn.Conv1d):
                x = F.conv2d(x, mod.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last), mod.bias)
            elif isinstance(mod, nn.MaxPool1d):
                x = F.max_pool2d(x, (1, mod.kernel_size))
            else:  # the activation: elementwise
                x = mod(x)
        return x.squeeze(2).flatten(1)


def gaussian_nll(mean: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor,
                 target_err: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                 beta: float = 0.0) -> torch.Tensor:
    """Mean Gaussian NLL over present labels; the label survey's own error adds to the variance,
    so the network learns the star's intrinsic scatter, not the training labels' noise.
    ``weight`` (B,): per-star weights of a weighted mean (label balancing, stellar.balance).
    ``beta`` > 0: the beta-NLL of Seitzer et al. (2022), each term weighted by its variance ** beta
    with the gradient stopped: the plain NLL divides every mean gradient by the variance, so the labels
    and stars the network is unsure of early are the ones it learns slowest, and it settles for a large
    variance where a better mean was there to learn; beta = 1 gives those terms the mean-square
    gradient, beta = 0.5 is between. The optimum of the variance is unchanged."""
    present = torch.isfinite(target)
    var = log_var.exp()
    if target_err is not None:
        var = var + torch.nan_to_num(target_err, nan=0.0) ** 2
    diff = torch.where(present, target - mean, torch.zeros_like(mean))
    nll = 0.5 * (diff**2 / var + torch.log(var))
    if beta:
        nll = nll * var.detach() ** beta
    w = present.to(nll.dtype)
    if weight is not None:
        w = w * weight.to(nll.dtype)[:, None]
    return (nll * w).sum() / w.sum().clamp(min=1e-12)


class StackedEnsemble(torch.nn.Module):
    """All members of an ensemble as one network: the first conv and dense layers of shared inputs
    concatenated, later convs grouped by member, dense layers as batched matmuls. Same arithmetic
    as the members one by one (up to float rounding), but a few large kernels instead of many
    small ones, which is what makes the CPU fast on small convolutions.

    The conv stack runs channels-last, spectra held as (B, L, C): oneDNN's 1-D convolutions
    in that layout (as a height-1 2-D convolution) take less than half the time of the
    (B, C, L) kernels here, and pooling becomes an elementwise max of neighbouring rows.
    A monotonic activation (ReLU, leaky ReLU) runs after the pool, on half the values: it
    commutes with max, so the result is the members' own."""

    def __init__(self, nets: list[torch.nn.Module]):
        super().__init__()
        cfg = nets[0].cfg
        self.cfg = cfg
        self.m = len(nets)
        self.n_labels = nets[0].n_labels
        self.act = activation(cfg.activation)
        self.monotonic = cfg.activation in ("relu", "leaky_relu")  # commutes with max-pooling
        cat = lambda ts: torch.nn.Parameter(torch.cat([t.detach() for t in ts]), requires_grad=False)  # noqa: E731
        stack = lambda ts: torch.nn.Parameter(torch.stack([t.detach() for t in ts]), requires_grad=False)  # noqa: E731
        if cfg.use_spectrum:
            self.convs = torch.nn.ModuleList()
            self.pools = []
            convs = [[mod for mod in net.conv if isinstance(mod, torch.nn.Conv1d)] for net in nets]
            for i, layer in enumerate(cfg.conv):
                first = convs[0][i]
                conv = torch.nn.Conv2d(first.in_channels * (1 if i == 0 else self.m), first.out_channels * self.m,
                                       (1, first.kernel_size[0]), groups=1 if i == 0 else self.m)
                conv.weight = torch.nn.Parameter(torch.cat([c[i].weight.detach() for c in convs])[:, :, None, :]
                                                 .contiguous(memory_format=torch.channels_last), requires_grad=False)
                conv.bias = cat([c[i].bias for c in convs])
                self.convs.append(conv)
                self.pools.append(layer.pool)
            self.spec_dense = self._dense([net.spec_dense for net in nets], stack)
        if cfg.use_xp:
            self.xp_dense = self._dense([net.xp_dense for net in nets], stack)
        if cfg.use_scalars:
            self.scalar_dense = self._dense([net.scalar_dense for net in nets], stack)
        self.head = self._dense([net.head for net in nets], stack)
        self.out_w = stack([net.out.weight.t() for net in nets])
        self.out_b = stack([net.out.bias[None, :] for net in nets])
        # every member shares the statistics, hence the output bounds (stellar.trust.bound_outputs)
        self.bounded = nets[0].bounded
        for key in ("lo", "hi", "m_lo", "m_hi"):
            self.register_buffer(f"bound_{key}", getattr(nets[0], f"bound_{key}").detach().clone(), persistent=False)

    @staticmethod
    def _dense(seqs, stack) -> torch.nn.ParameterList:
        layers = [[mod for mod in seq if isinstance(mod, torch.nn.Linear)] for seq in seqs]
        params = torch.nn.ParameterList()
        for i in range(len(layers[0])):
            params.append(stack([lay[i].weight.t() for lay in layers]))  # (M, in, out)
            params.append(stack([lay[i].bias[None, :] for lay in layers]))  # (M, 1, out)
        return params

    def _mlp(self, params, x: torch.Tensor) -> torch.Tensor:
        """x: (M, B, in) -> (M, B, out); activation after every layer, as in the members."""
        for i in range(0, len(params), 2):
            x = self.act(torch.baddbmm(params[i + 1], x, params[i]))
        return x

    def bound(self, mean: torch.Tensor) -> torch.Tensor:
        """The members' means bounded as each member bounds its own (:meth:`stellar.model.HybridNet.bound`);
        identity when the members are unbounded."""
        if not self.bounded:
            return mean
        from stellar.trust import bound_outputs

        return bound_outputs(mean, self.bound_lo, self.bound_hi, self.bound_m_lo, self.bound_m_hi)

    def forward(self, spectrum, mask, xp, scalars) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns means and log-variances of the normalised labels, (M, B, L) each."""
        b = spectrum.shape[0]
        parts = []
        if self.cfg.use_spectrum:
            keep = (~mask).to(spectrum.dtype)
            x = torch.stack([(spectrum - 1.0) * keep, 1.0 - keep], dim=2)  # (B, L, C)
            for conv, pool in zip(self.convs, self.pools):
                # (B, L, C) is the channels-last storage of (B, C, 1, L): views both ways, no copies
                x = conv(x.unsqueeze(1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).squeeze(1)
                if not self.monotonic:
                    x = self.act(x)
                if pool > 1:
                    length = x.shape[1] // pool
                    v = x[:, : length * pool].reshape(b, length, pool, x.shape[2])
                    x = torch.maximum(v[:, :, 0], v[:, :, 1]) if pool == 2 else v.amax(2)
                if self.monotonic:
                    x = self.act(x)
            # (B, L, M*C) -> (M, B, C*L): each member's own flatten order
            x = x.reshape(b, x.shape[1], self.m, -1).permute(2, 0, 3, 1).reshape(self.m, b, -1)
            parts.append(self._mlp(self.spec_dense, x))
        if self.cfg.use_xp:
            parts.append(self._mlp(self.xp_dense, xp.to(self.out_w.dtype).expand(self.m, -1, -1)))
        if self.cfg.use_scalars:
            parts.append(self._mlp(self.scalar_dense, scalars.to(self.out_w.dtype).expand(self.m, -1, -1)))
        h = self._mlp(self.head, torch.cat(parts, dim=2))
        out = torch.baddbmm(self.out_b, h, self.out_w)
        n = self.n_labels
        if self.cfg.heteroscedastic:
            return self.bound(out[..., :n]), out[..., n:].clamp(-12.0, 8.0)
        return self.bound(out), torch.zeros_like(out)
