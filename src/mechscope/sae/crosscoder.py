"""Crosscoders: one dictionary read from and written to several sources at once, here two models' activations at the
same hooks (model diffing: a base model and its fine-tune).

For sources ``s = 0 .. S-1`` (every hook of the base model, then the same hooks of the fine-tune) with activations
``x_s [d]``, per-source input scales ``g_s`` and ``F`` latents:

    f   = act(Σ_s g_s x_s W_enc[s] + b_enc)                                  [F]
    x̂_s = (f W_dec[:, s] + b_dec[s]) / g_s                                   [d]

(Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing"). Each latent ``j`` has one
decoder vector per source, ``d_j^s = W_dec[j, s]``; the decoders are left free (not unit norm), because their relative
norms are what model diffing reads: a latent whose fine-tune decoder is large and whose base decoder is near zero is a
candidate "fine-tune-only" concept. Sparsity sees each latent weighted by its decoders' size, the code norm
``c_j = Σ_s ||d_j^s||`` (the crosscoder note's choice), so a latent cannot buy sparsity by shrinking ``f`` and growing
its decoders:

- ``relu``, the L1 crosscoder: ``loss = Σ_s ||g_s x_s - x̂_s'||² + λ Σ_j c_j f_j`` (``x̂_s'`` in the scaled space);
- ``batchtopk`` (Minder et al. 2025, arXiv 2504.02922): keep the ``k · batch`` largest ``c_j f_j`` of a batch; at
  inference a latent is on where ``c_j f_j`` exceeds a threshold learned while training (a running mean of the
  smallest kept value). AuxK (Gao et al. 2024) on dead latents.

Training rows are ``[x_0 | x_1 | ... | x_{S-1}]`` (``S · d`` wide: :func:`mechscope.sae.data.harvest_pair`); the
trainer (:mod:`.train`) calls :meth:`Crosscoder.step_loss` as it does an SAE's. The weights keep
dictionary_learning's shapes (``W_enc [S, d, F]``; ``W_dec`` is held ``[F, S, d]`` and written ``[S, F, d]``), so its
files (``config.json`` + ``model.safetensors``, :func:`save_crosscoder` / :func:`load_crosscoder`) map one to one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.errors import InputError
from . import kernels as K
from .model import LossTerms, geometric_median, update_threshold

ARCHITECTURES = ("batchtopk", "relu")
CODE_NORMS = ("crosscoder", "sae", "none")
#: the two sides of a model pair, in the order the sources list them
SIDES = ("base", "ft")


@dataclass
class CrosscoderConfig:
    """Everything that defines a crosscoder (saved beside its weights). ``hooks``: the hook points read in each model;
    the sources are ``[base at hooks..., fine-tune at hooks...]``."""

    d_model: int
    d_sae: int
    hooks: tuple[str, ...]
    architecture: str = "batchtopk"
    k: int = 32  # batchtopk: active latents per token (mean over the batch)
    l1_coefficient: float = 1.0  # relu: λ of the decoder-norm-weighted L1 penalty
    l1_warmup_steps: int = 0  # relu: λ ramps up linearly over these steps
    code_normalization: str = "crosscoder"  # c_j: Σ_s ||d_j^s|| ("crosscoder"), ||[d_j^0 .. d_j^S]|| ("sae"), 1
    normalize_activations: str = "expected_average_only_in"  # per-source scales with E||g_s x_s||^2 = d
    dec_init_norm: float = 0.1  # each decoder vector's norm at initialisation (the encoder starts as its transpose)
    base_model: str = ""
    ft_model: str = ""
    k_aux: int | None = None  # AuxK's dead latents per token (default: S d / 2, Gao et al.'s d / 2 over the sources)
    aux_coefficient: float = 1 / 32
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.hooks = tuple(self.hooks)
        if not self.hooks:
            raise InputError("a crosscoder reads at least one hook in each model")
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"crosscoder architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.code_normalization not in CODE_NORMS:
            raise InputError(f"code_normalization must be one of {CODE_NORMS}, got {self.code_normalization!r}")
        if self.d_model < 1 or self.d_sae < 1:
            raise InputError(f"d_model and d_sae must be positive; got {self.d_model}, {self.d_sae}")
        if self.architecture == "batchtopk" and not 0 < self.k <= self.d_sae:
            raise InputError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")
        if not (self.l1_coefficient >= 0 and math.isfinite(self.l1_coefficient)):
            raise InputError(f"l1_coefficient must be a finite number >= 0, got {self.l1_coefficient}")
        if not self.dec_init_norm > 0:
            raise InputError(f"dec_init_norm must be positive, got {self.dec_init_norm}")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise InputError("normalize_activations must be 'none' or 'expected_average_only_in'")

    @property
    def n_sources(self) -> int:
        return 2 * len(self.hooks)

    @property
    def sources(self) -> list[tuple[str, str]]:
        """``[(side, hook)]`` per source: ``("base", hook)`` for every hook, then ``("ft", hook)``."""
        return [(side, h) for side in SIDES for h in self.hooks]

    @property
    def n_latents(self) -> int:
        return self.d_sae

    @property
    def row_width(self) -> int:
        return self.n_sources * self.d_model

    @property
    def row_desc(self) -> str:
        return (f"sources x d_model = {self.n_sources} x {self.d_model} (each hook in the base model, then the same "
                "hooks in the fine-tune)")

    @property
    def kind(self) -> str:
        return "crosscoder"

    @property
    def is_transcoder(self) -> bool:
        return False

    def side_sources(self, side: str) -> list[int]:
        """The source indices of one side (``"base"`` or ``"ft"``)."""
        if side not in SIDES:
            raise InputError(f"side must be one of {SIDES}, got {side!r}")
        n = len(self.hooks)
        return list(range(n)) if side == "base" else list(range(n, 2 * n))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hooks"] = list(self.hooks)
        return d


class Crosscoder(nn.Module):
    """A crosscoder over a model pair (see the module docstring). ``encode(x [..., S, d]) -> [..., F]``,
    ``decode(f) -> [..., S, d]``, ``forward``; :meth:`decoder_norms` ``[F, S]``; the trainer's protocol
    (:meth:`step_loss`, :meth:`init_from_sample`, :meth:`scaled_target`)."""

    def __init__(self, cfg: CrosscoderConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        S, d, F = cfg.n_sources, cfg.d_model, cfg.d_sae
        g = torch.Generator().manual_seed(seed)
        dec = torch.randn(F, S, d, generator=g)
        dec = dec / dec.norm(dim=-1, keepdim=True) * cfg.dec_init_norm
        self.W_dec = nn.Parameter(dec)  # [F, S, d]
        self.W_enc = nn.Parameter(dec.permute(1, 2, 0).contiguous())  # [S, d, F], the decoder's transpose
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(S, d))
        self.register_buffer("input_scale", torch.ones(S))
        self.register_buffer("threshold", torch.tensor(-1.0))  # batchtopk: on c_j f_j, learned while training
        self.batch_group = None  # set by the trainer when one batch is spread over ranks
        self.source = ""  # where it was read from
        self.explanations: dict[int, str] = {}

    # ------------------------------------------------------------------ reading
    def describe(self) -> str:
        c = self.cfg
        return (f"a {c.architecture} crosscoder ({c.d_sae} latents over {len(c.hooks)} hook(s) x 2 models"
                f"{', read from ' + self.source if self.source else ''})")

    def __repr__(self) -> str:
        c = self.cfg
        sparsity = f", k={c.k}" if c.architecture == "batchtopk" else f", l1={c.l1_coefficient:g}"
        return (f"Crosscoder({c.architecture}{sparsity}, {c.d_sae} latents, d_model={c.d_model}, hooks "
                f"{list(c.hooks)}, base {c.base_model or '?'!r}, fine-tune {c.ft_model or '?'!r})")

    def code_norm(self) -> torch.Tensor:
        """``[F]``: ``c_j``, what sparsity weighs latent ``j`` by (``cfg.code_normalization``)."""
        norms = self.W_dec.norm(dim=-1)  # [F, S]
        if self.cfg.code_normalization == "crosscoder":
            return norms.sum(-1)
        if self.cfg.code_normalization == "sae":
            return norms.pow(2).sum(-1).sqrt()
        return torch.ones_like(self.b_enc)

    @torch.no_grad()
    def decoder_norms(self, raw: bool = False) -> torch.Tensor:
        """``[F, S]``: each latent's decoder norm per source, in the normalised space each source is reconstructed in
        (``||d_j^s||``, what its relative norms compare: a model whose activations are larger does not get larger
        decoders for it; dictionary_learning's convention) or, with ``raw``, in the model's own units (``/ g_s``)."""
        n = self.W_dec.norm(dim=-1)
        return (n / self.input_scale if raw else n).float()

    @torch.no_grad()
    def decoder_directions(self, side: str) -> torch.Tensor:
        """``[F, n_hooks, d]``: each latent's raw-space decoder vectors into ``side``'s hooks."""
        idx = self.cfg.side_sources(side)
        return (self.W_dec[:, idx] / self.input_scale[idx][:, None]).float()

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, d] -> [B, F]``: ``Σ_s g_s x_s W_enc[s] + b_enc``."""
        xs = (x * self.input_scale[:, None]).reshape(x.shape[0], -1)
        return xs @ self.W_enc.reshape(-1, self.cfg.d_sae) + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., S, d] -> [..., F]``: the latents at inference (BatchTopK: its threshold on ``c_j f_j``, or, before one
        is learned, the top ``k`` per row)."""
        lead = x.shape[:-2]
        self._check_input(x)
        f = torch.relu(self.pre_acts(x.reshape(-1, *x.shape[-2:]).to(self.W_enc.dtype)))
        if self.cfg.architecture == "batchtopk":
            score = f * self.code_norm()
            if float(self.threshold) >= 0:
                f = f * (score > self.threshold)
            else:
                idx = score.topk(self.cfg.k, dim=-1).indices
                f = torch.zeros_like(f).scatter(-1, idx, f.gather(-1, idx))
        return f.reshape(*lead, -1)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``[..., F] -> [..., S, d]`` in the raw space."""
        lead = f.shape[:-1]
        out = f.reshape(-1, self.cfg.d_sae) @ self.W_dec.reshape(self.cfg.d_sae, -1)
        out = out.reshape(-1, self.cfg.n_sources, self.cfg.d_model) + self.b_dec
        return (out / self.input_scale[:, None]).reshape(*lead, self.cfg.n_sources, self.cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., S, d] -> [..., S, d]``: the reconstruction of every source."""
        return self.decode(self.encode(x))

    def _check_input(self, x: torch.Tensor) -> None:
        S, d = self.cfg.n_sources, self.cfg.d_model
        if x.dim() < 2 or tuple(x.shape[-2:]) != (S, d):
            raise InputError(f"a crosscoder over {S} sources of width {d} reads [..., {S}, {d}] (the base model's "
                             f"hooks, then the fine-tune's); got {tuple(x.shape)}")

    # ------------------------------------------------------------------ training (the trainer's protocol)
    @property
    def n_latents(self) -> int:
        return self.cfg.d_sae

    def split_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Training rows ``[B, S d]`` as ``[B, S, d]`` (raw space)."""
        return rows.reshape(rows.shape[0], self.cfg.n_sources, self.cfg.d_model)

    def scaled_target(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, S d]``: the reconstruction target in the scaled space."""
        return (self.split_rows(rows) * self.input_scale[:, None]).reshape(rows.shape[0], -1)

    @torch.no_grad()
    def init_from_sample(self, rows: torch.Tensor, method: str = "geometric_median") -> None:
        """Per-source input scales (``E||g_s x_s||^2 = d``), then ``b_dec`` at each source's geometric median (or
        mean) of the scaled activations."""
        x = self.split_rows(rows.float())
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.input_scale.copy_((self.cfg.d_model / x.pow(2).sum(-1).mean(0).clamp_min(1e-12)).sqrt())
        xs = x * self.input_scale[:, None]
        self.b_dec.copy_(geometric_median(xs, method))

    def set_decoder_norm_to_unit(self) -> None:
        """Nothing: a crosscoder's decoder norms are free (their ratio across the models is what diffing reads)."""

    def remove_parallel_grad(self) -> None:
        """Nothing (the decoders are not held on a sphere)."""

    def _k_aux(self, dead: torch.Tensor) -> int:
        return min(self.cfg.k_aux or max(1, self.cfg.row_width // 2), int(dead.sum()))

    def step_loss(self, rows: torch.Tensor, step_: int = 0, dead_mask: torch.Tensor | None = None,
                  sparse: bool = True) -> LossTerms:
        """The :class:`~mechscope.sae.model.LossTerms` of rows ``[B, S d]`` (scaled space): ``Σ_s ||g_s x_s - x̂_s'||²``
        plus the L1 penalty (relu) or AuxK on dead latents (batchtopk). ``sparse=False`` runs BatchTopK densely (what
        the tests compare the kernels with)."""
        cfg = self.cfg
        B, F = rows.shape[0], cfg.d_sae
        xs = self.scaled_target(rows)  # [B, S d]
        W_enc, W_dec = self.W_enc.reshape(-1, F), self.W_dec.reshape(F, -1)
        b_dec = self.b_dec.reshape(-1)
        c = self.code_norm()
        if cfg.architecture == "batchtopk":
            with torch.no_grad():
                pre = torch.addmm(self.b_enc, xs, W_enc)
                score = torch.relu(pre) * c.detach()
            g = self.batch_group
            thr = g.kth_largest(score.reshape(-1), cfg.k * g.global_rows) if g is not None and g.active else None
            pattern, kept = K.select_batch_topk(score, cfg.k, threshold=thr)
            update_threshold(self.threshold, kept, self.batch_group)  # on c_j f_j
            picked = pre[pattern.rows, pattern.cols]
            if sparse:
                vals = K.sparse_latents(xs, W_enc, self.b_enc, pattern, picked)
                recon = K.sparse_decode(vals, W_dec, pattern) + b_dec
            else:
                full = xs @ W_enc + self.b_enc
                f = torch.zeros_like(full).index_put((pattern.rows, pattern.cols), full[pattern.rows, pattern.cols])
                recon = f @ W_dec + b_dec
            fires = torch.bincount(pattern.cols, minlength=F)
            l0 = torch.tensor(pattern.cols.numel() / B)
        else:
            f = torch.relu(xs @ W_enc + self.b_enc)
            recon = f @ W_dec + b_dec
            on = f.detach() > 0
            fires, l0 = on.sum(0), on.sum(-1).float().mean()
        mse = nn.functional.mse_loss(recon, xs, reduction="sum") / B
        out = LossTerms(mse, mse, recon.detach(), fires, l0)
        if cfg.architecture == "relu":
            warm = min(1.0, (step_ + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps else 1.0
            out.l1 = (f * c).sum(-1).mean()
            out.loss = mse + warm * cfg.l1_coefficient * out.l1
        elif dead_mask is not None and bool(dead_mask.any()):
            err = (xs - recon).detach()
            dpattern, dpicked = K.select_topk(pre, self._k_aux(dead_mask), mask=dead_mask)
            dvals = K.sparse_latents(xs, W_enc, self.b_enc, dpattern, dpicked)
            aux = K.sparse_decode(dvals, W_dec, dpattern)
            out.aux = nn.functional.mse_loss(aux, err, reduction="sum") / B
            out.loss = mse + cfg.aux_coefficient * out.aux
        return out


# ---------------------------------------------------------------------------------------------- dictionary_learning
#: dictionary_learning's class names (its ``config.json`` ``dict_class``) for each architecture
DL_CLASS = {"batchtopk": "BatchTopKCrossCoder", "relu": "CrossCoder"}
_DL_CODE_NORM = {"CROSSCODER": "crosscoder", "SAE": "sae", "NONE": "none"}
_DL_CODE_NORM_ID = {"crosscoder": 1, "sae": 2, "none": 4}  # dictionary_learning's CodeNormalization enum values


def dictionary_learning_tensors(cc: Crosscoder) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, config)`` of ``cc`` in dictionary_learning's ``CrossCoder`` / ``BatchTopKCrossCoder`` layout: the
    ``PyTorchModelHubMixin`` folder its ``from_pretrained(..., from_hub=True)`` reads. The per-source scales are written
    as its activation normaliser (``activation_mean`` 0, ``activation_global_scale`` ``g_s``,
    ``keep_relative_variance``), so the weights and the thresholds stay as trained."""
    c = cc.cfg
    S, d = c.n_sources, c.d_model
    g = cc.input_scale.detach().float().cpu()
    t = {"encoder.weight": cc.W_enc.detach().float().cpu().contiguous(),
         "encoder.bias": cc.b_enc.detach().float().cpu().contiguous(),
         "decoder.weight": cc.W_dec.detach().float().cpu().permute(1, 0, 2).contiguous(),
         "decoder.bias": cc.b_dec.detach().float().cpu().contiguous(),
         "code_normalization_id": torch.tensor(_DL_CODE_NORM_ID[c.code_normalization]),
         "target_rms": torch.tensor(1.0),
         "activation_mean": torch.zeros(S, d),
         "activation_std": (1.0 / g / math.sqrt(d))[:, None].expand(S, d).contiguous(),
         "activation_global_scale": g.contiguous()}
    # the keys dictionary_learning's save_pretrained writes (its classes' __init__ arguments), in its order
    config = {"activation_dim": d, "activation_mean": None, "activation_std": None,
              "code_normalization": c.code_normalization.upper()}
    if c.architecture == "batchtopk":
        t["k"] = torch.tensor(c.k, dtype=torch.int32)
        t["threshold"] = cc.threshold.detach().float().cpu().reshape(())
        config.update({"dict_class": DL_CLASS[c.architecture], "dict_size": c.d_sae, "k": c.k, "norm_init_scale": 1.0,
                       "num_layers": S, "target_rms": 1.0})
    else:
        config.update({"code_normalization_alpha_cc": 0.1, "code_normalization_alpha_sae": 1.0,
                       "dict_class": DL_CLASS[c.architecture], "dict_size": c.d_sae, "encoder_layers": None,
                       "init_with_transpose": True, "latent_processor": None, "norm_init_scale": None,
                       "num_decoder_layers": None, "num_layers": S, "same_init_for_all_layers": False,
                       "target_rms": None})
    return t, config


def save_crosscoder(cc: Crosscoder, folder: "str | Path") -> Path:
    """``folder/config.json`` + ``folder/model.safetensors`` in dictionary_learning's layout (written to a temporary
    folder and renamed). mechscope's own facts (the hooks, the two models' names, the architecture's settings) go in
    the safetensors header's metadata, which dictionary_learning ignores."""
    from safetensors.torch import save

    from ..core.files import atomic_dir

    if not isinstance(cc, Crosscoder):
        raise InputError(f"save_crosscoder takes a Crosscoder, got {type(cc).__name__}")
    tensors, config = dictionary_learning_tensors(cc)
    meta = {"mechscope": json.dumps({"config": cc.cfg.to_dict(), "format": "dictionary_learning crosscoder"})}
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "model.safetensors").write_bytes(save(tensors, metadata=meta))
        if cc.explanations:
            (tmp / "explanations.json").write_text(json.dumps({str(k): v for k, v in cc.explanations.items()}))
    return folder


def load_crosscoder(path: "str | Path", hooks: "list[str] | str | None" = None, revision: str | None = None,
                    base_model: str = "", ft_model: str = "") -> Crosscoder:
    """A crosscoder from a dictionary_learning folder (``config.json`` + ``model.safetensors``): a local folder or
    ``hf://<org>/<repo>[@<revision>][/<folder>]`` through the Hugging Face cache (the published Gemma-2-2B base/IT
    crosscoders are such folders). ``hooks``: the hook point(s) it reads in each model, needed for files that do not
    record them (dictionary_learning's do not; mechscope's do); the sources are read as
    ``[base at hooks..., fine-tune at hooks...]``, dictionary_learning's order (index 0 the base model)."""
    from ..core.files import read_json, read_safetensors
    from .hub import download, parse_spec

    where = str(path)
    if where.startswith("hf://"):
        repo, rev, sub = parse_spec(where)
        folder = download(repo, sub, rev or revision)
    else:
        folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        has = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "nothing (no such folder)"
        raise InputError(f"{where} is not a dictionary_learning crosscoder folder: it needs config.json and "
                         f"model.safetensors, and has {has}")
    config = read_json(folder / "config.json", "a dictionary_learning crosscoder config")
    t, meta = read_safetensors(folder / "model.safetensors", "a dictionary_learning crosscoder", with_metadata=True)
    saved = _saved_config(meta.get("mechscope"), folder)
    need = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
    missing = [k for k in need if k not in t]
    if missing:
        raise InputError(f"{folder / 'model.safetensors'} lacks {missing}; a dictionary_learning crosscoder holds "
                         f"{list(need)}")
    S, d, F = t["encoder.weight"].shape
    if tuple(t["decoder.weight"].shape) != (S, F, d) or tuple(t["decoder.bias"].shape) != (S, d) \
            or tuple(t["encoder.bias"].shape) != (F,):
        raise InputError(f"{folder / 'model.safetensors'}: encoder.weight {tuple(t['encoder.weight'].shape)} asks for "
                         f"decoder.weight [{S}, {F}, {d}], decoder.bias [{S}, {d}], encoder.bias [{F}]; got "
                         f"{tuple(t['decoder.weight'].shape)}, {tuple(t['decoder.bias'].shape)}, "
                         f"{tuple(t['encoder.bias'].shape)}")
    for key, want in (("activation_dim", d), ("dict_size", F), ("num_layers", S)):
        if key in config and config[key] != want:
            raise InputError(f"{folder / 'config.json'} says {key}={config[key]}, the weights have {want}")
    if S % 2:
        raise InputError(f"{where} has {S} sources; a model-diffing crosscoder has an even number (each hook in the "
                         "base model, then in the fine-tune)")
    if saved is not None:
        try:
            cfg = CrosscoderConfig(**saved)
        except TypeError as e:
            raise InputError(f"{folder / 'model.safetensors'}: its mechscope config does not fit this version ({e})") \
                from e
    else:
        if hooks is None:
            raise InputError(f"{where} does not say which hook it reads (dictionary_learning's files do not); pass "
                             f"hooks=, e.g. 'blocks.13.hook_resid_post' for a crosscoder on layer 13's output "
                             f"(it has {S // 2} hook(s) per model)")
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if len(hooks) != S // 2:
            raise InputError(f"{where} has {S} sources ({S // 2} per model); pass {S // 2} hook(s), got {len(hooks)}")
        dl_class = config.get("dict_class") or ("BatchTopKCrossCoder" if "k" in t or "k" in config else "CrossCoder")
        arch = {v: k for k, v in DL_CLASS.items()}.get(dl_class)
        if arch is None:
            raise InputError(f"{folder / 'config.json'}: dict_class {dl_class!r} is not a crosscoder mechscope reads "
                             f"({', '.join(DL_CLASS.values())})")
        norm = _code_norm_of(config, t, folder)
        k = int(t["k"]) if "k" in t else int(config.get("k", 1))
        cfg = CrosscoderConfig(d_model=d, d_sae=F, hooks=tuple(hooks), architecture=arch, k=max(1, min(k, F)),
                               code_normalization=norm, normalize_activations="none", base_model=base_model,
                               ft_model=ft_model, extra={"dictionary_learning_config": config})
    cc = Crosscoder(cfg)
    scale, mean = _normaliser(t, S, d, folder)
    with torch.no_grad():
        W_enc, b_enc = t["encoder.weight"].float(), t["encoder.bias"].float()
        W_dec, b_dec = t["decoder.weight"].float().permute(1, 0, 2), t["decoder.bias"].float()
        if mean is not None:  # fold x - μ into the encoder's bias and μ into the decoder's bias (exact)
            b_enc = b_enc - torch.einsum("sd,sdf->f", mean * scale[:, None], W_enc)
            b_dec = b_dec + mean * scale[:, None]
        cc.W_enc.copy_(W_enc)
        cc.b_enc.copy_(b_enc)
        cc.W_dec.copy_(W_dec)
        cc.b_dec.copy_(b_dec)
        cc.input_scale.copy_(scale)
        if "threshold" in t:
            thr = t["threshold"].float().reshape(-1)
            if thr.numel() != 1:
                raise InputError(f"{where}: a per-layer threshold (dictionary_learning's DECOUPLED code normalisation) "
                                 "is not supported; mechscope reads one threshold")
            cc.threshold.copy_(thr[0])
    for name, p in cc.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise InputError(f"{folder / 'model.safetensors'}: {name} holds NaN or Inf")
    cc.source = where
    return cc


def _saved_config(meta: "str | None", folder: Path) -> "dict | None":
    """The mechscope config a file's metadata records (None for dictionary_learning's own files)."""
    if not meta:
        return None
    try:
        saved = json.loads(meta)["config"]
        saved["hooks"] = tuple(saved["hooks"])
        return saved
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{folder / 'model.safetensors'}: its mechscope metadata is damaged ({e}); pass hooks= and "
                         "read it as a dictionary_learning file by removing the metadata, or save it again") from e


def _code_norm_of(config: dict, t: dict, folder: Path) -> str:
    name = config.get("code_normalization")
    if name is None and "code_normalization_id" in t:
        name = {v: k for k, v in _DL_CODE_NORM_ID.items()}.get(int(t["code_normalization_id"]), "?").upper()
    name = (name or "CROSSCODER").upper()  # dictionary_learning's default, and what files older than the field used
    if name not in _DL_CODE_NORM:
        raise InputError(f"{folder}: code normalization {name!r} is not supported; mechscope reads "
                         f"{', '.join(_DL_CODE_NORM)}")
    return _DL_CODE_NORM[name]


def _normaliser(t: dict, S: int, d: int, folder: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dictionary_learning's activation normaliser as ``(g [S], μ [S, d] or None)``: ``x -> (x - μ) g``. Files without
    one (or with NaN, its "none") read as ``g = 1``."""
    mean, std, scale = t.get("activation_mean"), t.get("activation_std"), t.get("activation_global_scale")
    if mean is None or std is None or bool(torch.isnan(mean).any()) or bool(torch.isnan(std).any()):
        return torch.ones(S), None
    if scale is None or tuple(scale.reshape(-1).shape) != (S,):
        raise InputError(f"{folder}: an activation normaliser without a per-source activation_global_scale (neuron-wise "
                         "normalisation, keep_relative_variance=False) is not supported")
    mean = mean.float().reshape(S, d)
    return scale.float().reshape(S), (mean if bool(mean.abs().gt(0).any()) else None)
