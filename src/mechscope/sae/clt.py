"""Cross-layer transcoders: an encoder per layer, and decoders from each layer to it and every later layer.

A CLT covering model layers ``cfg.layers`` (source index ``s``, target index ``t``: positions in that tuple)
reads ``x_s`` at each layer's input hook and predicts every covered layer's MLP output ``y_t``:

    a_s = act(i_s x_s W_enc[s] + b_enc[s])                                  [.., F]
    ŷ_t = (Σ_{s ≤ t < s + reach} a_s W_dec[s][:, t - s] + b_dec[t] + i_t x_t W_skip[t]) / o_t

(Ameisen et al. 2025, "Circuit Tracing", §2.1; Lindsey et al. 2024, "Sparse Crosscoders"). ``reach`` 0 writes to
every later layer: a CLT, ``L (L + 1) / 2`` decoder blocks of ``F x d``. ``reach`` 1 writes only to its own layer:
a set of per-layer transcoders (PLTs), trained and read by the same code, so that the two compare on equal terms.
``tied``: one decoder per source layer, shared by all its targets (``L`` blocks instead of ``L (L + 1) / 2``; a
feature then writes the same vector into every later MLP output). ``i_s`` and ``o_t`` are per-layer input and
output scales (``E ||i x||^2 = d``, fitted on a sample) that saving folds into the weights.

Activations: ``relu``; ``topk`` (the ``k`` largest per token and layer); ``batchtopk`` (Bussmann et al. 2024:
the ``k x batch`` largest of a layer over the batch while training, then a learned per-layer threshold, which
makes it a JumpReLU at inference and on disk); ``jumprelu`` (Rajamanoharan et al. 2024: ``pre · H(pre - θ)``
with a per-feature threshold, trained with an L0 penalty through straight-through gradients).

Training (:meth:`CrossLayerTranscoder.step_loss`) reads rows ``[x_0 .. x_{L-1} | y_0 .. y_{L-1}]``
(``2 L d`` wide, :func:`mechscope.sae.data.harvest_bundle`) and runs in the scaled space: the loss is
``Σ_t ||o_t y_t - ŷ_t||^2`` (each layer weighted alike by its scale). TopK, BatchTopK and JumpReLU use the
sparse kernels of :mod:`.kernels`: only the encoder's matmul is dense; each source's decode costs
``nnz x T x d`` instead of ``batch x F x T x d``. Each feature's decoder (all its targets together) is kept
at unit norm, as an SAE's decoder row is.

A CLT read from published files may keep its decoders on disk (:class:`DecoderFiles`): only the rows of the
features a prompt activates are read, as circuit-tracer's ``lazy_decoder`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.errors import InputError
from . import kernels as K
from .model import LossTerms, geometric_median, heaviside, jumprelu, update_threshold

if TYPE_CHECKING:
    from ..core.model import HookedModel
    from .model import SAE

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


@dataclass
class CLTConfig:
    """Everything that defines a cross-layer transcoder (saved beside its weights)."""

    d_model: int
    d_sae: int  # features per source layer
    layers: tuple[int, ...]  # the model layers it covers, increasing
    input_hooks: tuple[str, ...]  # per covered layer: the hook its encoder reads
    output_hooks: tuple[str, ...]  # per covered layer: the hook its decoders write (hook_mlp_out)
    architecture: str = "batchtopk"
    k: int = 32  # topk / batchtopk: active features per token and layer
    reach: int = 0  # target layers per source: 0 every later one (a CLT), 1 its own (per-layer transcoders)
    tied: bool = False  # one decoder per source layer, shared by its targets
    skip: bool = False  # a linear skip x W_skip per layer
    model_name: str = ""
    normalize_activations: str = "none"  # "expected_average_only_in": per-layer input and output scales
    l0_coefficient: float = 1e-3
    jumprelu_init_threshold: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    k_aux: int | None = None  # AuxK's dead features per token and layer (default: d_model / 2 / the mean targets)
    aux_coefficient: float = 1 / 32
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layers = tuple(int(x) for x in self.layers)
        self.input_hooks, self.output_hooks = tuple(self.input_hooks), tuple(self.output_hooks)
        n = len(self.layers)
        if n == 0 or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise InputError(f"a CLT covers increasing, distinct model layers; got {list(self.layers)}")
        if len(self.input_hooks) != n or len(self.output_hooks) != n:
            raise InputError(f"a CLT over {n} layers needs {n} input and {n} output hooks; got "
                             f"{len(self.input_hooks)} and {len(self.output_hooks)}")
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"CLT architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.d_model < 1 or self.d_sae < 1:
            raise InputError(f"d_model and d_sae must be positive; got {self.d_model}, {self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise InputError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")
        if not 0 <= self.reach:
            raise InputError(f"reach must be 0 (every later layer) or a positive number of layers, got {self.reach}")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise InputError("normalize_activations must be 'none' or 'expected_average_only_in'")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_latents(self) -> int:
        """Features over all layers (what firing counts and dead-latent masks index)."""
        return self.n_layers * self.d_sae

    @property
    def row_width(self) -> int:
        """A training row: every layer's input, then every layer's target."""
        return 2 * self.n_layers * self.d_model

    @property
    def row_desc(self) -> str:
        return (f"2 x layers x d_model = 2 x {self.n_layers} x {self.d_model} (the inputs of every covered layer, "
                "then their targets)")

    @property
    def kind(self) -> str:
        """``"clt"``, ``"plt"`` (reach 1) or ``"clt reach R"``."""
        return "plt" if self.reach == 1 else "clt" if self.reach in (0,) or self.reach >= self.n_layers else \
            f"clt reach {self.reach}"

    def n_targets(self, s: int) -> int:
        """How many layers source ``s`` writes to."""
        left = self.n_layers - s
        return left if self.reach == 0 else min(self.reach, left)

    def decoder_blocks(self) -> int:
        """``F x d`` decoder blocks held: ``L (L + 1) / 2`` for a CLT, ``L`` tied or per-layer."""
        return self.n_layers if self.tied else sum(self.n_targets(s) for s in range(self.n_layers))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"], d["input_hooks"], d["output_hooks"] = list(self.layers), list(self.input_hooks), list(self.output_hooks)
        return d


class DecoderFiles:
    """Decoder rows read from safetensors files only for the features asked for (circuit-tracer's ``lazy_decoder``).

    ``entries[s] = (file, tensor name, first target)``: the tensor is ``[F, T, d]`` (circuit-tracer's
    ``W_dec_{s}``: ``T = L - s``, first target 0; Gemma Scope 2's per-layer CLT ``w_dec``: ``T = L``, first
    target ``s``) or ``[F, d]`` (a per-layer transcoder). Rows come back as float32 ``[m, n_targets, d]``."""

    def __init__(self, entries: list[tuple[Path, str, int]], n_targets: list[int]):
        self.entries, self.n_targets = entries, n_targets

    def rows(self, s: int, feats: torch.Tensor) -> torch.Tensor:
        from ..core.files import read_rows

        path, key, first = self.entries[s]
        t = read_rows(path, key, feats.detach().cpu().long().tolist(), "a CLT decoder").float()
        if t.dim() == 2:
            t = t[:, None]
        return t[:, first:first + self.n_targets[s]]

    def bytes_on_disk(self) -> int:
        return sum(Path(p).stat().st_size for p, _, _ in dict.fromkeys(self.entries))


class _Place(torch.autograd.Function):
    """``base [B, L, d]`` plus each source's write ``outs[s] [B, T_s, d]`` into layers ``s .. s + spans[s] - 1`` (a tied
    decoder's ``[B, 1, d]`` write goes to each of its ``spans[s]`` targets). The backward pass hands each write its
    slice of the gradient (a view; summed over the targets for a tied one) instead of the full-size copies that
    autograd's in-place slice writes make, which cost most of a step."""

    @staticmethod
    def forward(ctx, base, spans, *outs):
        recon = base.clone()
        for s, (span, out) in enumerate(zip(spans, outs)):
            if out is not None and span:
                recon[:, s:s + span] += out
        ctx.spans, ctx.widths = spans, [None if o is None else o.shape[1] for o in outs]
        return recon

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for s, (span, width) in enumerate(zip(ctx.spans, ctx.widths)):
            g = None if width is None else grad[:, s:s + span]
            grads.append(g.sum(1, keepdim=True) if g is not None and width == 1 and span > 1 else g)
        return (grad, None, *grads)


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder (or, with ``reach`` 1, a set of per-layer transcoders); see the module docstring.

    Model-layer API (what attribution graphs use; ``layer`` is a model layer of ``cfg.layers``):
    :meth:`encode`, :meth:`pre_acts_at`, :meth:`read_directions`, :meth:`write_directions` (``[m, targets, d]``),
    :meth:`targets`, :meth:`decoder_bias`, :meth:`skip_term`, :meth:`input_hook`, :meth:`output_hook`.
    Index API (training, files): :meth:`pre_acts_index`, :meth:`decoder_rows`, :meth:`forward`."""

    def __init__(self, cfg: CLTConfig, seed: int = 0, decoders: DecoderFiles | None = None, init: bool = True):
        super().__init__()
        self.cfg = cfg
        n, d, F = cfg.n_layers, cfg.d_model, cfg.d_sae
        g = torch.Generator().manual_seed(seed)
        self.explanations: dict[int, dict[int, str]] = {}  # layer -> feature -> explanation, where known
        self.source = ""  # where it was read from, when it was read
        self.notes: list[str] = []  # what its reader noticed (another model named in its files, ...)
        self.W_enc = nn.ParameterList([nn.Parameter(torch.randn(d, F, generator=g) / d ** 0.5 if init else
                                                    torch.empty(0)) for _ in range(n)])
        self.b_enc = nn.Parameter(torch.zeros(n, F))
        self.decoders = decoders  # lazily read decoders (then W_dec is empty)
        blocks = []
        if decoders is None and init:
            for s in range(n):
                w = torch.randn(F, 1 if cfg.tied else cfg.n_targets(s), d, generator=g)
                blocks.append(nn.Parameter(w / w.flatten(1).norm(dim=-1)[:, None, None]))
        self.W_dec = nn.ParameterList(blocks)
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.W_skip = nn.ParameterList([nn.Parameter(torch.zeros(d, d) if init else torch.empty(0)) for _ in range(n)]
                                       if cfg.skip else [])
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n, F), float(torch.tensor(cfg.jumprelu_init_threshold).log())))
        self.register_buffer("threshold", torch.full((n,), -1.0))  # BatchTopK: per layer, learned while training
        self.register_buffer("input_scale", torch.ones(n))
        self.register_buffer("output_scale", torch.ones(n))
        self.batch_group = None  # set by the trainer when one batch is spread over ranks
        self._index = {layer: i for i, layer in enumerate(cfg.layers)}

    # ------------------------------------------------------------------ layers
    @property
    def layers(self) -> list[int]:
        """The model layers with an encoder (every covered layer)."""
        return list(self.cfg.layers)

    @property
    def output_layers(self) -> list[int]:
        """The model layers whose MLP output it predicts."""
        return list(self.cfg.layers)

    @property
    def model_name(self) -> str:
        return self.cfg.model_name

    def index(self, layer: int) -> int:
        """The position of model layer ``layer`` in ``cfg.layers``."""
        if layer not in self._index:
            raise InputError(f"the CLT covers layers {list(self.cfg.layers)}, not layer {layer}")
        return self._index[layer]

    def targets(self, layer: int) -> list[int]:
        """The model layers a feature of ``layer`` writes to."""
        s = self.index(layer)
        return list(self.cfg.layers[s:s + self.cfg.n_targets(s)])

    def input_hook(self, layer: int) -> str:
        return self.cfg.input_hooks[self.index(layer)]

    def output_hook(self, layer: int) -> str:
        return self.cfg.output_hooks[self.index(layer)]

    def n_features(self, layer: int) -> int:
        return self.cfg.d_sae

    def has_skip(self, layer: int) -> bool:
        return self.cfg.skip

    def explanations_of(self, layer: int) -> dict[int, str]:
        return self.explanations.get(layer, {})

    def describe(self) -> str:
        """What it is, in a few words (a graph's stats and the CLI say it)."""
        c = self.cfg
        return (f"{'per-layer transcoders' if c.reach == 1 else 'a cross-layer transcoder'} ({c.architecture}, "
                f"{c.n_layers} layers x {c.d_sae} features{', read from ' + self.source if self.source else ''})")

    def __repr__(self) -> str:
        c = self.cfg
        sparsity = f"k={c.k}" if c.architecture in ("topk", "batchtopk") else ""
        where = f", decoders on disk ({self.source})" if self.decoders is not None else ""
        return (f"CrossLayerTranscoder({c.kind}, {c.architecture}{', ' + sparsity if sparsity else ''}, layers "
                f"{c.layers[0]}..{c.layers[-1]} ({c.n_layers}), d_model={c.d_model}, {c.d_sae} features per layer"
                f"{', tied' if c.tied else ''}{', skip' if c.skip else ''}{where})")

    # ------------------------------------------------------------------ encoding (index API, raw inputs)
    def pre_acts_index(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [..., F]``: source ``s``'s pre-activations ``i_s x W_enc[s] + b_enc[s]``."""
        return (x * self.input_scale[s]) @ self.W_enc[s] + self.b_enc[s]

    def _theta(self, s: int) -> torch.Tensor:
        """``[F]``: source ``s``'s JumpReLU thresholds."""
        return self.log_threshold[s].float().exp()

    def activate(self, s: int, pre: torch.Tensor) -> torch.Tensor:
        """Inference activation of source ``s`` (BatchTopK: its learned threshold, or top-k per token before one)."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "jumprelu":
            return jumprelu(pre, self._theta(s).to(pre.dtype), self.cfg.jumprelu_bandwidth)
        if arch == "batchtopk" and float(self.threshold[s]) >= 0:
            r = torch.relu(pre)
            return r * (r > self.threshold[s])
        r = torch.relu(pre)
        vals, idx = r.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(r).scatter(-1, idx, vals)

    def encode_index(self, s: int, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(x.requires_grad and torch.is_grad_enabled()):
            return self.activate(s, self.pre_acts_index(s, x))

    # ------------------------------------------------------------------ decoders
    def decoder_rows(self, s: int, feats: torch.Tensor | None = None) -> torch.Tensor:
        """``[m, n_targets(s), d]``: source ``s``'s decoders (scaled space) for ``feats`` (default all), read from
        disk for a lazily loaded CLT; tied decoders expanded over the targets."""
        T = self.cfg.n_targets(s)
        if self.decoders is not None:
            feats = torch.arange(self.cfg.d_sae) if feats is None else feats
            return self.decoders.rows(s, feats).to(self.b_dec.device)
        w = self.W_dec[s] if feats is None else self.W_dec[s][feats.to(self.W_dec[s].device)]
        return w.expand(-1, T, -1) if self.cfg.tied else w

    def _out_scales(self, s: int) -> torch.Tensor:
        return self.output_scale[s:s + self.cfg.n_targets(s)]

    # ------------------------------------------------------------------ the model-layer API (raw space)
    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``[..., d] -> [..., F]``: layer ``layer``'s feature activations."""
        return self.encode_index(self.index(layer), x)

    def pre_acts_at(self, layer: int, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``x [m, d]``, ``feats [m]`` -> ``[m]``: row i's pre-activation of feature ``feats[i]`` of ``layer``."""
        s = self.index(layer)
        W = self.W_enc[s][:, feats.to(self.b_enc.device)]
        return ((x * self.input_scale[s]) * W.T).sum(-1) + self.b_enc[s][feats]

    def read_directions(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """``[m, d]``: the gradient of each feature's pre-activation by its input, ``i_s W_enc[:, f]``."""
        s = self.index(layer)
        return (self.W_enc[s][:, feats.to(self.b_enc.device)] * self.input_scale[s]).T

    def write_directions(self, layer: int, feats: torch.Tensor) -> torch.Tensor:
        """``[m, len(targets(layer)), d]``: what one unit of each feature adds to each target's output (raw space)."""
        s = self.index(layer)
        return self.decoder_rows(s, feats) / self._out_scales(s)[None, :, None]

    def decoder_bias(self, layer: int) -> torch.Tensor:
        """``[d]``: target ``layer``'s output bias (raw space)."""
        t = self.index(layer)
        return self.b_dec[t] / self.output_scale[t]

    def skip_term(self, layer: int, x: torch.Tensor) -> torch.Tensor | float:
        """Layer ``layer``'s linear skip ``i x W_skip / o`` (raw space); 0 without a skip."""
        if not self.cfg.skip:
            return 0.0
        t = self.index(layer)
        return (x * self.input_scale[t]) @ self.W_skip[t] / self.output_scale[t]

    def layer_view(self, layer: int) -> "CLTLayer":
        """Layer ``layer``'s encoder as the SAE-like object dashboards and labels read."""
        return CLTLayer(self, layer)

    # ------------------------------------------------------------------ the whole map
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., L, d]`` (every covered layer's input) -> ``[..., L, d]`` the predicted MLP outputs (raw space)."""
        n, d = self.cfg.n_layers, self.cfg.d_model
        lead = x.shape[:-2]
        xs = x.reshape(-1, n, d)
        out = self.b_dec[None].expand(xs.shape[0], n, d).clone()
        for s in range(n):
            a = self.encode_index(s, xs[:, s])
            nz = a.abs().sum(0).nonzero(as_tuple=True)[0]
            if nz.numel():
                T = self.cfg.n_targets(s)
                out[:, s:s + T] += (a[:, nz] @ self.decoder_rows(s, nz).reshape(nz.numel(), -1)).reshape(-1, T, d)
        if self.cfg.skip:
            out = out + torch.stack([(xs[:, t] * self.input_scale[t]) @ self.W_skip[t] for t in range(n)], 1)
        return (out / self.output_scale[:, None]).reshape(*lead, n, d)

    # ------------------------------------------------------------------ training
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    def split_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training rows ``[B, 2 L d]`` as inputs and targets, each ``[B, L, d]`` (raw space)."""
        n, d = self.cfg.n_layers, self.cfg.d_model
        return rows[:, :n * d].reshape(-1, n, d), rows[:, n * d:].reshape(-1, n, d)

    def scaled_target(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, L d]``: the decoders' targets in the scaled space (what ``LossTerms.recon`` estimates)."""
        _, y = self.split_rows(rows)
        return (y * self.output_scale[:, None]).reshape(y.shape[0], -1)

    @torch.no_grad()
    def init_from_sample(self, rows: torch.Tensor, method: str = "geometric_median", iters: int = 50) -> None:
        """Fit the per-layer input and output scales (``E||i x||^2 = d``), then ``b_dec`` at each layer's geometric
        median (Weiszfeld) or mean of the scaled targets."""
        x, y = self.split_rows(rows.float())
        d = self.cfg.d_model
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.input_scale.copy_((d / x.pow(2).sum(-1).mean(0).clamp_min(1e-12)).sqrt())
            self.output_scale.copy_((d / y.pow(2).sum(-1).mean(0).clamp_min(1e-12)).sqrt())
        if self.cfg.architecture == "jumprelu":  # thresholds at which about k features per token fire at the start
            xs = x * self.input_scale[:, None]
            q = 1 - min(self.cfg.k, self.cfg.d_sae) / self.cfg.d_sae
            for s in range(self.cfg.n_layers):
                pre = xs[:, s] @ self.W_enc[s] + self.b_enc[s]
                self.log_threshold[s] = pre.flatten()[:2_000_000].quantile(q).clamp_min(1e-3).log()
        self.b_dec.copy_(geometric_median(y * self.output_scale[:, None], method, iters))

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        """Each feature's decoder over all its targets at unit norm."""
        for w in self.W_dec:
            w /= w.flatten(1).norm(dim=-1).clamp(min=1e-8)[:, None, None]

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Keep each feature's decoder on the unit sphere: drop its gradient's component along it."""
        for w in self.W_dec:
            if w.grad is not None:
                g, v = w.grad.flatten(1), w.flatten(1)
                g -= (g * v).sum(-1, keepdim=True) * v

    def _k_aux(self, dead: torch.Tensor) -> int:
        """AuxK's dead features per token and layer: ``cfg.k_aux``, by default ``d_model / 2`` (Gao et al.'s choice for
        an SAE) divided by the mean number of targets, so that the auxiliary decode costs what an SAE's does (each of
        a CLT feature's writes goes to every later layer: at ``d_model / 2`` it tripled a step's time)."""
        c = self.cfg
        default = max(1, round(c.d_model / 2 * c.n_layers / c.decoder_blocks()))
        return min(c.k_aux or default, int(dead.sum()))

    def _update_threshold(self, s: int, kept: torch.Tensor) -> None:
        """BatchTopK's inference threshold of source ``s``: a running mean (0.99) of its smallest kept activation."""
        update_threshold(self.threshold[s], kept, self.batch_group)

    def _select(self, s: int, pre: torch.Tensor) -> tuple[K.Pattern, torch.Tensor]:
        """The entries of source ``s`` that take part in this step (and their pre-activations): TopK's and
        BatchTopK's kept entries; for JumpReLU every entry above ``θ - bandwidth / 2`` (those below the
        threshold still carry its straight-through gradient)."""
        arch = self.cfg.architecture
        if arch == "topk":
            return K.select_topk(pre, self.cfg.k)
        if arch == "batchtopk":
            g = self.batch_group
            thr = g.kth_largest(pre.reshape(-1).detach(), self.cfg.k * g.global_rows) if g is not None and g.active \
                else None
            pattern, picked = K.select_batch_topk(pre, self.cfg.k, threshold=thr)
            self._update_threshold(s, picked)
            return pattern, picked
        low = self._theta(s) - self.cfg.jumprelu_bandwidth / 2 if arch == "jumprelu" else 0.0
        rows, cols = (pre > low).nonzero(as_tuple=True)
        return K.Pattern(rows, cols, tuple(pre.shape)), pre[rows, cols]

    def step_loss(self, rows: torch.Tensor, step_: int = 0, dead_mask: torch.Tensor | None = None,
                  sparse: bool = True) -> LossTerms:
        """The :class:`~mechscope.sae.model.LossTerms` of a batch of rows ``[B, 2 L d]`` (scaled space):
        ``Σ_t ||o_t y_t - ŷ_t||^2``, plus the L0 penalty (JumpReLU) or AuxK on dead features (TopK, BatchTopK).
        ``sparse=False`` runs the same maths densely (what the tests compare the kernels with)."""
        cfg = self.cfg
        n, d, F = cfg.n_layers, cfg.d_model, cfg.d_sae
        x, y = self.split_rows(rows)
        B = x.shape[0]
        xs, ys = x * self.input_scale[:, None], y * self.output_scale[:, None]
        base = self.b_dec[None].expand(B, n, d) + (torch.stack([xs[:, t] @ self.W_skip[t] for t in range(n)], 1)
                                                   if cfg.skip else 0.0)
        fires, l0, penalty, sources, outs = [], 0.0, 0.0, [], []
        for s in range(n):
            D = self.W_dec[s].reshape(F, -1)  # [F, T d] (tied: [F, d])
            if sparse and cfg.architecture != "relu":
                with torch.no_grad():
                    pre = torch.addmm(self.b_enc[s], xs[:, s], self.W_enc[s])
                pattern, picked = self._select(s, pre)
                vals = K.sparse_latents(xs[:, s], self.W_enc[s], self.b_enc[s], pattern, picked)
                if cfg.architecture == "jumprelu":
                    theta = self._theta(s)[pattern.cols]
                    penalty = penalty + heaviside(vals, theta, cfg.jumprelu_bandwidth).sum() / B
                    vals = jumprelu(vals, theta, cfg.jumprelu_bandwidth)
                out = K.sparse_decode(vals, D, pattern)
                on = vals.detach() > 0
                fires.append(torch.bincount(pattern.cols[on], minlength=F))
                l0 = l0 + int(on.sum()) / B
                sources.append((pattern, vals, pre))
            else:
                pre = xs[:, s] @ self.W_enc[s] + self.b_enc[s]
                if cfg.architecture == "jumprelu":
                    theta = self._theta(s)
                    penalty = penalty + heaviside(pre, theta, cfg.jumprelu_bandwidth).sum() / B
                    f = jumprelu(pre, theta, cfg.jumprelu_bandwidth)
                elif cfg.architecture == "relu":
                    f = torch.relu(pre)
                else:
                    pattern, picked = self._select(s, pre.detach())
                    f = torch.zeros_like(pre).index_put((pattern.rows, pattern.cols), pre[pattern.rows, pattern.cols])
                out = f @ D
                on = f.detach() > 0
                fires.append(on.sum(0))
                l0 = l0 + float(on.sum()) / B
                sources.append((None, None, pre.detach()))
            outs.append(out.reshape(B, -1, d))  # [B, T, d]; tied: [B, 1, d], one write broadcast over the targets
        recon = _Place.apply(base, tuple(cfg.n_targets(s) for s in range(n)), *outs)
        mse = nn.functional.mse_loss(recon, ys, reduction="sum") / B  # one fused pass (and one back) over [B, L, d]
        out = LossTerms(mse, mse, recon.detach().reshape(B, -1), torch.cat(fires), torch.tensor(float(l0)))
        if cfg.architecture == "jumprelu":
            out.l0_penalty = penalty
            out.loss = mse + cfg.l0_coefficient * penalty
        elif cfg.architecture in ("topk", "batchtopk") and dead_mask is not None and bool(dead_mask.any()):
            out.aux = self._aux_loss(ys - recon.detach(), xs, sources, dead_mask.reshape(n, F))
            out.loss = mse + cfg.aux_coefficient * out.aux
        return out

    def _aux_loss(self, err: torch.Tensor, xs: torch.Tensor, sources: list, dead: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024) per source: the ``k_aux`` largest pre-activations among a layer's dead features
        decode into its targets, and together they fit the (detached) error ``err [B, L, d]``."""
        cfg = self.cfg
        B, n, d = err.shape
        outs = []
        for s, (_, _, pre) in enumerate(sources):
            if not bool(dead[s].any()):
                outs.append(None)
                continue
            pattern, picked = K.select_topk(pre, self._k_aux(dead[s]), mask=dead[s])
            vals = K.sparse_latents(xs[:, s], self.W_enc[s], self.b_enc[s], pattern, picked)
            outs.append(K.sparse_decode(vals, self.W_dec[s].reshape(cfg.d_sae, -1), pattern).reshape(B, -1, d))
        if all(o is None for o in outs):
            return err.new_zeros(())
        aux = _Place.apply(err.new_zeros(B, n, d), tuple(cfg.n_targets(s) for s in range(n)), *outs)
        return nn.functional.mse_loss(aux, err, reduction="sum") / B

    # ------------------------------------------------------------------ conversion
    @classmethod
    @torch.no_grad()
    def from_transcoders(cls, transcoders: "list[SAE]", model_name: str = "") -> "CrossLayerTranscoder":
        """Per-layer transcoders (mechscope's :class:`~mechscope.sae.model.SAE` transcoders, any subset of layers) as one
        ``reach`` 1 CLT computing the same maths, their scales folded in: what saving them in circuit-tracer's
        layout goes through. They must share a width and an activation (JumpReLU, ReLU, TopK with one ``k``, or
        trained BatchTopK, read as the JumpReLU it is at inference)."""
        from ..core.hookpoints import split_name
        from .model import SAE

        tcs = sorted(transcoders, key=lambda t: split_name(t.cfg.hook_name_out)[0] if isinstance(t, SAE) else -1)
        if not tcs or not all(isinstance(t, SAE) and t.cfg.is_transcoder for t in tcs):
            raise InputError("from_transcoders takes a list of transcoder SAEs (each with a hook_name_out)")
        archs = {"jumprelu" if t.cfg.architecture in ("batchtopk", "matryoshka") else t.cfg.architecture for t in tcs}
        widths, ks = {t.cfg.d_sae for t in tcs}, {t.cfg.k for t in tcs}
        if len(archs) > 1 or len(widths) > 1 or (archs == {"topk"} and len(ks) > 1):
            raise InputError(f"the transcoders differ in activation or width ({sorted(archs)}, widths {sorted(widths)}, "
                             f"k {sorted(ks)}); one CLT holds one of each")
        bad = [t.cfg.hook_name for t in tcs if t.cfg.architecture in ("batchtopk", "matryoshka") and float(t.threshold) < 0]
        if bad:
            raise InputError(f"{bad[0]}: a BatchTopK transcoder without an inference threshold yet; train it first")
        layers = tuple(split_name(t.cfg.hook_name_out)[0] for t in tcs)
        skip = any(t.cfg.skip for t in tcs)
        d, F = tcs[0].cfg.d_in, tcs[0].cfg.d_sae
        cfg = CLTConfig(d_model=d, d_sae=F, layers=layers, input_hooks=tuple(t.cfg.hook_name for t in tcs),
                        output_hooks=tuple(t.cfg.hook_name_out for t in tcs), architecture=archs.pop(), k=tcs[0].cfg.k,
                        reach=1, skip=skip, model_name=model_name or tcs[0].cfg.model_name)
        clt = cls(cfg, init=True)
        feats = torch.arange(F)
        for s, t in enumerate(tcs):
            clt.W_enc[s].copy_(t.read_directions(feats).T.float())
            clt.b_enc[s] = t.b_enc.float()
            clt.W_dec[s].copy_(t.write_directions(feats).float()[:, None])
            clt.b_dec[s] = t.decode(torch.zeros(F)).float()
            if skip:
                clt.W_skip[s].copy_(t.skip_term(torch.eye(d)).float() if t.cfg.skip else torch.zeros(d, d))
            if cfg.architecture == "jumprelu":
                thr = t.log_threshold.float().exp() if t.cfg.architecture == "jumprelu" else \
                    torch.full((F,), float(t.threshold))
                clt.log_threshold[s] = thr.clamp_min(0).log()
        clt.explanations = {layer: dict(getattr(t, "explanations", {})) for layer, t in zip(layers, tcs)}
        return clt

    @torch.no_grad()
    def inference_thresholds(self) -> torch.Tensor:
        """``[L, F]``: the per-feature JumpReLU thresholds inference uses (BatchTopK: its per-layer threshold)."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.float().exp()
        if self.cfg.architecture == "batchtopk":
            if bool((self.threshold < 0).any()):
                raise InputError("this BatchTopK CLT has no inference threshold yet for some layers: train it before "
                                 "saving")
            return self.threshold.float()[:, None].expand(-1, self.cfg.d_sae).clone()
        return torch.zeros(self.cfg.n_layers, self.cfg.d_sae)

    def check_fits(self, model: "HookedModel") -> None:
        """A clear error unless every hook exists in ``model`` with width ``d_model`` and every layer is the model's."""
        from ..core.hookpoints import spec

        bad = [layer for layer in self.cfg.layers if layer >= model.cfg.n_layers]
        if bad:
            raise InputError(f"the CLT covers layers up to {self.cfg.layers[-1]}, but {model.cfg.model_name or 'the model'} "
                             f"has {model.cfg.n_layers} layers (0..{model.cfg.n_layers - 1}); load a CLT trained on "
                             "this model")
        for hook in dict.fromkeys(self.cfg.input_hooks + self.cfg.output_hooks):
            model.manager.check(hook)
            width = spec(hook).width(model.cfg.to_dict())
            if width != self.cfg.d_model:
                name = model.cfg.model_name or "the model"
                raise InputError(f"the CLT has d_model={self.cfg.d_model} but {hook} of {name} has width {width}; "
                                 "load a CLT trained on this model")


class CLTLayer:
    """One layer of a :class:`CrossLayerTranscoder` seen as an SAE by dashboards and labels: it encodes that layer's
    input, and its ``write_directions`` are each feature's writes summed over its targets (its total direct
    write into the residual stream)."""

    def __init__(self, clt: CrossLayerTranscoder, layer: int):
        from types import SimpleNamespace

        self.clt, self.layer = clt, layer
        c = clt.cfg
        self.cfg = SimpleNamespace(hook_name=clt.input_hook(layer), hook_name_out=clt.output_hook(layer),
                                   d_sae=c.d_sae, d_in=c.d_model, architecture=c.architecture, is_transcoder=True,
                                   model_name=c.model_name)
        self.explanations = clt.explanations_of(layer)

    def encode(self, x: torch.Tensor, grad: bool | None = None) -> torch.Tensor:
        """``[..., d] -> [..., F]`` on ``x``'s device."""
        with torch.no_grad():
            return self.clt.encode(self.layer, x.to(self.clt.b_enc.device).float()).to(x.device)

    def write_directions(self, features: torch.Tensor) -> torch.Tensor:
        """``[m, d]``: each feature's writes summed over its targets, on the CPU."""
        return self.clt.write_directions(self.layer, features).sum(1).cpu()

    def parameters(self) -> "Iterator[nn.Parameter]":
        """The CLT's parameters (what feature_stats asks for the device)."""
        return self.clt.parameters()
