"""Sparse autoencoders: ReLU + L1, TopK, BatchTopK and JumpReLU.

All four share ``x_hat = f(x) @ W_dec + b_dec`` with ``f(x) = act(pre)``,
``pre = (x - b_dec) @ W_enc + b_enc``, decoder rows at unit norm, ``W_enc`` initialised as
``W_dec^T``, and ``b_dec`` initialised at the geometric median (or mean) of the data.

- ``relu`` (SAELens "standard"): ``f = relu(pre)``; loss ``||x - x_hat||^2 + λ Σ_i f_i ||W_dec,i||``
  (L1 weighted by decoder norm; Bricken et al. 2023, Conerly et al. 2024), λ warmed up linearly.
- ``topk`` (Gao et al. 2024): keep the ``k`` largest ``relu(pre)`` per example; AuxK loss: the
  ``k_aux`` largest pre-activations among dead latents reconstruct the residual error, weighted 1/32.
- ``batchtopk`` (Bussmann et al. 2024): keep the ``k x batch`` largest over the whole batch during
  training; at inference a single learned threshold ``θ`` (a running mean of the smallest kept
  activation) gives a JumpReLU, which is how it is saved.
- ``jumprelu`` (Rajamanoharan et al. 2024): ``f = pre · H(pre - θ)`` with per-latent ``θ = exp(log θ)``
  kept in fp32; straight-through gradients for ``θ`` through a rectangle kernel of width
  ``bandwidth``; loss ``||x - x_hat||^2 + λ L0``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ..core.errors import InputError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
BATCH_TOPK = ("batchtopk", "matryoshka")  # BatchTopK's activation and inference threshold


@dataclass
class LossTerms:
    """The terms of one training step. ``loss`` is what is minimised; ``recon`` ``[n, d_in]`` (detached,
    in the scaled space), ``fires`` ``[d_sae]`` (examples each latent fired on) and ``l0`` feed the
    monitoring. ``l1`` (ReLU), ``l0_penalty`` (JumpReLU) and ``aux`` (AuxK) are None where unused.
    ``terms["mse"]`` and ``"aux" in terms`` read the fields by name."""

    loss: torch.Tensor
    mse: torch.Tensor
    recon: torch.Tensor
    fires: torch.Tensor
    l0: torch.Tensor
    l1: torch.Tensor | None = None
    l0_penalty: torch.Tensor | None = None
    aux: torch.Tensor | None = None
    matryoshka: torch.Tensor | None = None  # the inner prefixes' reconstruction losses, summed

    def __getitem__(self, name: str) -> torch.Tensor:
        value = getattr(self, name, None) if name in {f.name for f in fields(self)} else None
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: str) -> bool:
        return getattr(self, name, None) is not None


@dataclass
class SAEConfig:
    """Everything that defines an SAE and how it was trained (saved in ``cfg.json``)."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    hook_name: str = ""
    model_name: str = ""
    k: int = 32
    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 0
    k_aux: int | None = None
    aux_coefficient: float = 1 / 32
    l0_coefficient: float = 1e-3
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    normalize_activations: str = "none"  # "none" | "expected_average_only_in"
    apply_b_dec_to_input: bool = True  # pre = (x - b_dec) W_enc + b_enc; False: x W_enc + b_enc (Gemma/Llama Scope)
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)
    # a transcoder (Dunefsky et al. 2024) reads hook_name and reconstructs hook_name_out (an MLP's input -> output)
    hook_name_out: str = ""
    d_out: int = 0  # the target's width (0: d_in)
    skip: bool = False  # a linear skip connection x W_skip added to the output ("skip transcoder")
    # Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2025): the nested prefixes, each reconstructing on its own
    # (the last is d_sae; empty: d_sae/8, d_sae/4, d_sae/2, d_sae)
    matryoshka_widths: tuple[int, ...] = ()

    @property
    def is_transcoder(self) -> bool:
        return bool(self.hook_name_out)

    @property
    def width_out(self) -> int:
        return self.d_out or self.d_in

    @property
    def n_latents(self) -> int:
        """Latents the trainer keeps firing counts for."""
        return self.d_sae

    @property
    def row_width(self) -> int:
        """The width of a training row: ``d_in`` for an SAE, ``d_in + d_out`` (input, then target) for a transcoder."""
        return self.d_in + self.width_out if self.is_transcoder else self.d_in

    @property
    def row_desc(self) -> str:
        return f"d_in + d_out = {self.d_in} + {self.width_out} (input, then target)" if self.is_transcoder else \
            f"d_in={self.d_in}"

    def __post_init__(self):
        if self.is_transcoder:
            self.apply_b_dec_to_input = False  # b_dec lives in the output space: it is never subtracted from x
        elif self.skip or self.d_out:
            raise InputError("skip and d_out are for transcoders: give hook_name_out (the hook the SAE reconstructs)")
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise InputError("normalize_activations must be 'none' or 'expected_average_only_in'")
        if self.architecture in ("topk",) + BATCH_TOPK and not 0 < self.k <= self.d_sae:
            raise InputError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")
        if self.architecture == "matryoshka" and not self.matryoshka_widths:
            self.matryoshka_widths = tuple(w for w in (self.d_sae // 8, self.d_sae // 4, self.d_sae // 2) if w) + (self.d_sae,)
        w = tuple(int(x) for x in self.matryoshka_widths)
        if w and (list(w) != sorted(set(w)) or w[0] < 1 or w[-1] != self.d_sae):
            raise InputError(f"matryoshka_widths must be increasing prefix sizes ending at d_sae ({self.d_sae}), "
                             f"e.g. [{self.d_sae // 4}, {self.d_sae // 2}, {self.d_sae}]; got {list(w)}")
        self.matryoshka_widths = w

    def to_dict(self) -> dict:
        return asdict(self)


def _to_shape(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``g`` summed over the leading dimensions a broadcast threshold of ``shape`` did not have."""
    return g.sum(tuple(range(g.dim() - len(shape)))) if g.dim() > len(shape) else g


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre - θ)``; gradient for θ through a rectangle kernel (Rajamanoharan et al. 2024). ``θ`` is one per
    latent (broadcast over the batch) or one per entry of ``pre`` (the sparse kernels' kept entries)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        rect = ((pre - threshold).abs() < bw / 2).to(grad.dtype)
        g_pre = grad * (pre > threshold)
        g_thr = _to_shape(-(threshold / bw) * rect * grad, threshold.shape)
        return g_pre, g_thr, None


class _Step(torch.autograd.Function):
    """``H(pre - θ)`` with the same straight-through gradient for θ (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        rect = ((pre - threshold).abs() < bw / 2).to(grad.dtype)
        return torch.zeros_like(pre), _to_shape(-(1.0 / bw) * rect * grad, threshold.shape), None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``pre · H(pre - θ)`` with the straight-through gradient for ``θ`` (``θ`` per latent or per entry)."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def heaviside(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``H(pre - θ)``, whose sum is the L0 penalty, with the straight-through gradient for ``θ``."""
    return _Step.apply(pre, threshold, bandwidth)


@torch.no_grad()
def update_threshold(threshold: torch.Tensor, kept: torch.Tensor, batch_group: object | None = None) -> None:
    """BatchTopK's inference threshold (Bussmann et al. 2024), updated in place: a running mean (0.99) of the smallest
    value kept this step (over the whole batch when it is spread over ranks: ``batch_group``); unset (< 0) it starts at
    that value. Shared by SAEs, CLTs (one per layer) and crosscoders."""
    m = kept.min() if kept.numel() else torch.tensor(float("inf"), dtype=kept.dtype, device=kept.device)
    if batch_group is not None and batch_group.active:  # the smallest kept value of the whole batch
        m = -batch_group.kth_largest(-m.reshape(1).float(), 1)
    if torch.isfinite(m):
        threshold.copy_(m if threshold < 0 else 0.99 * threshold + 0.01 * m)


@torch.no_grad()
def geometric_median(x: torch.Tensor, method: str = "geometric_median", iters: int = 50) -> torch.Tensor:
    """``[n, ..., d] -> [..., d]``: the point minimising ``Σ_i ||x_i - m||`` for each index of ``...`` (Weiszfeld's
    iterations from the mean), or the mean with ``method="mean"``: where a decoder bias starts."""
    m = x.mean(0)
    if method == "geometric_median":
        for _ in range(iters):
            w = 1.0 / (x - m).norm(dim=-1).clamp(min=1e-6)  # [n, ...]
            m = (w[..., None] * x).sum(0) / w.sum(0)[..., None]
    elif method != "mean":
        raise InputError("method must be 'geometric_median' or 'mean'")
    return m


class SAE(nn.Module):
    """A sparse autoencoder over ``[..., d_in]`` activations; see the module docstring for the maths."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.explanations: dict[int, str] = {}  # feature -> its autointerp explanation (sae explain), where known
        g = torch.Generator().manual_seed(seed)
        d_out = cfg.width_out
        W_dec = torch.randn(cfg.d_sae, d_out, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        W_enc = W_dec.T.clone() if d_out == cfg.d_in else torch.randn(cfg.d_in, cfg.d_sae, generator=g) / cfg.d_in ** 0.5
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, d_out))
        self.register_buffer("output_scale", torch.tensor(1.0))  # a transcoder's target scale (an SAE uses input_scale)
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), float(torch.tensor(cfg.jumprelu_init_threshold).log())))
        # BatchTopK's inference threshold, and the input scale of "expected_average_only_in"
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("input_scale", torch.tensor(1.0))
        # set by the trainer when one batch is spread over ranks (mechscope.distributed): BatchTopK then keeps
        # the k x global-batch largest values of the union of the ranks' batches, as one process would
        self.batch_group = None

    def _batch_threshold(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The smallest value BatchTopK keeps across the whole distributed batch (None in one process)."""
        g = self.batch_group
        if g is None or not g.active:
            return None
        return g.kth_largest(flat.detach(), self.cfg.k * g.global_rows)

    # ------------------------------------------------------------------ maths
    def scale_in(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.input_scale

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """``scale·x - b_dec`` (without ``- b_dec`` when ``apply_b_dec_to_input`` is off)."""
        xs = self.scale_in(x)
        return (xs - self.b_dec) if self.cfg.apply_b_dec_to_input else xs

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae]``: ``(scale·x - b_dec) @ W_enc + b_enc`` (without ``- b_dec`` when ``apply_b_dec_to_input`` is off)."""
        return self._encoder_input(x) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, training: bool = False) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk" or (arch in BATCH_TOPK and not training and self.threshold < 0):
            r = torch.relu(pre)
            vals, idx = r.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(r).scatter(-1, idx, vals)
        if arch in BATCH_TOPK:
            r = torch.relu(pre)
            if not training:  # inference: the learned global threshold
                return r * (r > self.threshold)
            flat = r.reshape(-1)
            thr = self._batch_threshold(flat)
            if thr is not None:
                return (flat * (flat >= thr)).reshape(r.shape)
            n = min(flat.numel(), self.cfg.k * r.reshape(-1, r.shape[-1]).shape[0])
            vals, idx = flat.topk(n)
            return torch.zeros_like(flat).scatter(0, idx, vals).reshape(r.shape)
        thr = self.log_threshold.float().exp()
        return jumprelu(pre, thr.to(pre.dtype), self.cfg.jumprelu_bandwidth)

    def encode(self, x: torch.Tensor, grad: bool | None = None) -> torch.Tensor:
        """``[..., d_in] -> [..., d_sae]`` feature activations (inference mode).

        Without gradients unless asked (``grad=True``) or ``x`` itself requires them: encoding a cache
        gives a plain tensor, not one that drags the SAE's parameters into an autograd graph."""
        if grad is None:
            grad = x.requires_grad
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.activate(self.pre_acts(x), training=False)

    def extra_repr(self) -> str:
        """What ``print(sae)`` shows: architecture, sizes, sparsity setting, hooks and dtype."""
        c = self.cfg
        with torch.no_grad():
            thr = float(self.log_threshold.exp().mean()) if c.architecture == "jumprelu" else float("nan")
            bthr = float(self.threshold)
        sparsity = {"topk": f"k={c.k}", "relu": f"l1={c.l1_coefficient}", "jumprelu": f"threshold mean {thr:.4g}",
                    }.get(c.architecture, "")
        if c.architecture in BATCH_TOPK:
            sparsity = f"k={c.k}, " + (f"threshold={bthr:.4g}" if bthr >= 0 else "no inference threshold yet (top-k per token)")
        if c.matryoshka_widths:
            sparsity += f", prefixes {list(c.matryoshka_widths)}"
        hooks = f"hook={c.hook_name!r}" + (f" -> {c.hook_name_out!r} (transcoder{', skip' if c.skip else ''})"
                                           if c.is_transcoder else "")
        return (f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}" + (f", d_out={c.width_out}" if c.is_transcoder
                                                                        else "")
                + f", {sparsity}, {hooks}, dtype={self.W_enc.dtype}".replace(", ,", ","))

    @property
    def _out_scale(self) -> torch.Tensor:
        """The scale of the decoder's space: a transcoder's own output scale, an SAE's input scale."""
        return self.output_scale if self.cfg.is_transcoder else self.input_scale

    def scale_out(self, y: torch.Tensor) -> torch.Tensor:
        """The decoder's target in the scaled space: a transcoder's own output scale, an SAE's input scale."""
        return y * self._out_scale

    def _skip(self, x: torch.Tensor) -> torch.Tensor | float:
        """``scale·x @ W_skip`` for a skip transcoder (in the scaled output space), else 0."""
        return self.scale_in(x) @ self.W_skip if self.cfg.skip else 0.0

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``[..., d_sae] -> [..., d_out]`` in the raw activation space: ``(f @ W_dec + b_dec) / scale``
        (a skip transcoder's ``x W_skip`` term needs ``x``: use :meth:`forward`)."""
        return (f @ self.W_dec + self.b_dec) / self._out_scale

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | float:
        """A skip transcoder's linear term ``scale·x @ W_skip`` in the raw output space (0 without a skip)."""
        return self._skip(x) / self.output_scale if self.cfg.skip else 0.0

    def write_directions(self, features: torch.Tensor) -> torch.Tensor:
        """``[n] -> [n, d_out]``: what one unit of each feature adds to the output (raw space), ``W_dec[f] / scale``."""
        return self.W_dec[features] / self._out_scale

    def read_directions(self, features: torch.Tensor) -> torch.Tensor:
        """``[n] -> [n, d_in]``: the gradient of each feature's pre-activation by the input, ``scale · W_enc[:, f]``."""
        return (self.W_enc[:, features] * self.input_scale).T

    def pre_acts_at(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``x [n, d_in]``, ``features [n]`` -> ``[n]``: row i's pre-activation of feature ``features[i]`` only."""
        return (self._encoder_input(x) * self.W_enc[:, features].T).sum(-1) + self.b_enc[features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction (an SAE) or the prediction of ``hook_name_out`` (a transcoder) of ``x [..., d_in]``."""
        out = self.decode(self.encode(x))
        return out + self.skip_term(x) if self.cfg.skip else out

    # ------------------------------------------------------------------ training
    @property
    def n_latents(self) -> int:
        return self.cfg.d_sae

    def split_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A training row's input and target: ``(x, None)`` for an SAE; ``(x[:, :d_in], x[:, d_in:])`` for a
        transcoder, whose rows are :func:`~mechscope.sae.data.harvest_pairs`'s ``[input | target]``."""
        if not self.cfg.is_transcoder:
            return rows, None
        return rows[:, :self.cfg.d_in], rows[:, self.cfg.d_in:]

    def scaled_target(self, rows: torch.Tensor) -> torch.Tensor:
        """The decoder's target rows in the scaled space (the inputs of an SAE, the targets of a transcoder)."""
        xi, yt = self.split_rows(rows)
        return self.scale_out(xi if yt is None else yt)

    def init_from_sample(self, rows: torch.Tensor, method: str = "geometric_median") -> None:
        """Fit the input (and a transcoder's output) scale, then ``b_dec``, on a sample of training rows."""
        xi, yt = self.split_rows(rows)
        self.fit_input_scale(xi, yt)
        self.init_b_dec(xi if yt is None else yt, method)

    def step_loss(self, rows: torch.Tensor, step: int = 0, dead_mask: torch.Tensor | None = None,
                  sparse: bool = False) -> LossTerms:
        """:meth:`training_loss` of training rows (a transcoder's split into input and target): what the trainer
        calls, for an SAE as for a :class:`~mechscope.sae.clt.CrossLayerTranscoder`."""
        xi, yt = self.split_rows(rows)
        return self.training_loss(xi, step, dead_mask, sparse=sparse, target=yt)

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor, method: str = "geometric_median", iters: int = 50) -> None:
        """Set ``b_dec`` to the geometric median (Weiszfeld iterations) or the mean of the scaled decoder
        target ``[n, d_out]`` (the inputs for an SAE, the outputs for a transcoder)."""
        self.b_dec.copy_(geometric_median(self.scale_out(x.float()), method, iters))

    @torch.no_grad()
    def fit_input_scale(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """``expected_average_only_in``: scale inputs so that ``E||scale·x||^2 = d_in`` (Anthropic, April 2024);
        a transcoder's targets ``y`` get their own scale the same way."""
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.input_scale.fill_(float((self.cfg.d_in / x.float().pow(2).sum(-1).mean()).sqrt()))
            if self.cfg.is_transcoder and y is not None:
                self.output_scale.fill_(float((self.cfg.width_out / y.float().pow(2).sum(-1).mean()).sqrt()))

    def _target(self, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.is_transcoder:
            if target is None:
                raise InputError(f"a transcoder ({self.cfg.hook_name} -> {self.cfg.hook_name_out}) trains on "
                                 "(input, target) pairs: pass target=")
            return self.scale_out(target)
        return self.scale_in(x)

    def training_loss(self, x: torch.Tensor, step: int = 0, dead_mask: torch.Tensor | None = None,
                      sparse: bool = False, target: torch.Tensor | None = None) -> LossTerms:
        """The :class:`LossTerms` of a batch ``x [n, d_in]``, computed in the scaled space. ``sparse=True``
        computes TopK and BatchTopK with the sparse kernels of :mod:`mechscope.sae.kernels`
        (same values and gradients, one dense matmul instead of five). A transcoder reconstructs
        ``target [n, d_out]`` (``||y - (f W_dec + b_dec + x W_skip)||^2``) instead of ``x``.
        """
        cfg = self.cfg
        if sparse and cfg.architecture in ("topk", "batchtopk"):  # Matryoshka takes the dense path
            return self._sparse_training_loss(x, dead_mask, target)
        xs = self.scale_in(x)
        ts = self._target(x, target)
        pre = ((xs - self.b_dec) if cfg.apply_b_dec_to_input else xs) @ self.W_enc + self.b_enc
        f = self.activate(pre, training=True)
        recon = f @ self.W_dec + self.b_dec + self._skip(x)
        err = ts - recon
        mse = err.pow(2).sum(-1).mean()
        on = f.detach() > 0
        out = LossTerms(mse, mse, recon.detach(), on.sum(0), on.sum(-1).float().mean())
        if cfg.architecture == "relu":
            warm = min(1.0, (step + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps else 1.0
            out.l1 = (f * self.W_dec.norm(dim=-1)).sum(-1).mean()
            out.loss = mse + warm * cfg.l1_coefficient * out.l1
        elif cfg.architecture == "jumprelu":
            thr = self.log_threshold.float().exp()
            out.l0_penalty = heaviside(pre, thr.to(pre.dtype), cfg.jumprelu_bandwidth).sum(-1).mean()
            out.loss = mse + cfg.l0_coefficient * out.l0_penalty
        else:
            if cfg.architecture in BATCH_TOPK:
                self._update_threshold(f.detach()[on])
            if dead_mask is not None and bool(dead_mask.any()):
                dead_pre = torch.relu(pre).masked_fill(~dead_mask, 0.0)
                vals, idx = dead_pre.topk(self._k_aux(dead_mask), dim=-1)
                aux_recon = torch.zeros_like(dead_pre).scatter(-1, idx, vals) @ self.W_dec
                self._add_aux(out, err, aux_recon)
            if cfg.architecture == "matryoshka":
                out.matryoshka = self._prefix_losses(f, ts, x)
                out.loss = out.loss + out.matryoshka
        return out

    def _prefix_losses(self, f: torch.Tensor, ts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Matryoshka: ``sum_m ||y - (f[:, :m] W_dec[:m] + b_dec + skip)||^2`` over the inner prefixes ``m`` (the
        whole dictionary's term is the ordinary MSE), each prefix built on the last (Bussmann et al. 2025)."""
        partial, start, total = self.b_dec + self._skip(x), 0, f.new_zeros(())
        for width in self.cfg.matryoshka_widths[:-1]:
            partial = partial + f[:, start:width] @ self.W_dec[start:width]
            total = total + (ts - partial).pow(2).sum(-1).mean()
            start = width
        return total

    @torch.no_grad()
    def prefix_reconstruction(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """``[n, d_out]``: the reconstruction (raw space) from the first ``width`` latents only."""
        f = self.encode(x)
        out = (f[..., :width] @ self.W_dec[:width] + self.b_dec) / self._out_scale
        return out + self.skip_term(x) if self.cfg.skip else out

    def _k_aux(self, dead_mask: torch.Tensor) -> int:
        return min(self.cfg.k_aux or self.cfg.d_in // 2, int(dead_mask.sum()))

    def _add_aux(self, out: LossTerms, err: torch.Tensor, aux_recon: torch.Tensor) -> None:
        """AuxK (Gao et al. 2024): dead latents reconstruct the detached residual error, weighted ``aux_coefficient``."""
        out.aux = (err.detach() - aux_recon).pow(2).sum(-1).mean()
        out.loss = out.mse + self.cfg.aux_coefficient * out.aux

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        """BatchTopK's inference threshold: a running mean (0.99) of the smallest kept activation."""
        update_threshold(self.threshold, kept, self.batch_group)

    def _sparse_training_loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None,
                              target: torch.Tensor | None = None) -> LossTerms:
        from . import kernels as K

        cfg = self.cfg
        xs = self.scale_in(x)
        ts = self._target(x, target)
        xc = (xs - self.b_dec) if cfg.apply_b_dec_to_input else xs
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc)  # the one dense matmul
        if cfg.architecture == "topk":
            pattern, picked = K.select_topk(pre, cfg.k)
        else:
            thr = self._batch_threshold(pre.reshape(-1))
            pattern, picked = K.select_batch_topk(pre, cfg.k, threshold=thr)
            self._update_threshold(picked)
        vals = K.sparse_latents(xc, self.W_enc, self.b_enc, pattern, picked)
        recon = K.sparse_decode(vals, self.W_dec, pattern) + self.b_dec + self._skip(x)
        err = ts - recon
        mse = err.pow(2).sum(-1).mean()
        fires = torch.bincount(pattern.cols, minlength=cfg.d_sae)
        out = LossTerms(mse, mse, recon.detach(), fires, torch.tensor(pattern.cols.numel() / x.shape[0]))
        if dead_mask is not None and bool(dead_mask.any()):
            ap, apicked = K.select_topk(pre, self._k_aux(dead_mask), mask=dead_mask)
            aux_vals = K.sparse_latents(xc, self.W_enc, self.b_enc, ap, apicked)
            self._add_aux(out, err, K.sparse_decode(aux_vals, self.W_dec, ap))
        return out

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Keep decoder rows on the unit sphere: drop the gradient component along each row."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec
