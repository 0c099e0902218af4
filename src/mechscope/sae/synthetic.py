"""A synthetic world with known features, to judge an SAE against ground truth (SynthSAEBench).

After Chanin et al. 2026, "Evaluating Sparse Autoencoders on Scalable Realistic Synthetic Data"
(arXiv 2602.14687), whose SynthSAEBench-16k world :meth:`SynthConfig.synth_16k` rebuilds. A sample is
``x = sum_i a_i d_i + b`` over ``N`` unit feature directions ``d_i`` in ``R^D`` (nearly orthogonal: random,
then pushed apart), where feature ``i``

- fires with a Zipfian probability ``p_i`` (rank ``i``), through a Gaussian copula with a low-rank
  correlation (``g = eps F^T + eta sqrt(1 - |F_i|^2)``, fire where ``g_i > Phi^-1(1 - p_i)``);
- fires with magnitude ``relu(mu_i + sigma_i z)`` (``mu`` linear over ranks, ``sigma`` folded normal);
- sits in a forest of trees: a child fires only if its parent fires (its magnitude scaled by the parent's
  over the parent's mean when ``scale_children_by_parent``), and siblings under a mutually exclusive
  parent keep one of those that fired, at random.

The metrics compare an SAE's decoder and firing with the truth: MCC (the mean |cosine| of a one-to-one
Hungarian match of decoder rows to features; arXiv 2505.20254), per-latent precision/recall/F1 as a
detector of its best-matching feature, uniqueness (distinct best matches over latents), L0, dead
latents, shrinkage and explained variance. :func:`train_on_world` trains any mechscope SAE on fresh samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..analysis.metrics import StreamedExplainedVariance
from ..core.errors import InputError
from ..core.files import atomic_write, read_safetensors
from ..core.result import Result
from .model import SAE, SAEConfig

if TYPE_CHECKING:
    from .train import TrainConfig

#: the stream offsets from the world seed, one per random part (so changing one part leaves the others)
_DICT, _STD, _CORR, _TREE = 0, 1, 4, 3


@dataclass
class SynthConfig:
    """The parameters of a synthetic world. The defaults are a CI-sized world (2,048 features in 128
    dimensions) with SynthSAEBench-16k's proportions; :meth:`synth_16k` is the published world."""

    num_features: int = 2048
    hidden_dim: int = 128
    zipf_exponent: float = 0.5
    p_max: float = 0.4
    p_min: float = 5e-4
    roots: int = 16  # trees of the hierarchy (breadth first: all roots, then their children, ...)
    branching: int = 4
    depth: int = 3  # levels below a root
    mutually_exclusive: float = 1.0  # share of parents whose children exclude each other
    scale_children_by_parent: bool = True  # v2: a child's magnitude times parent / parent's mean
    compensate: bool = True  # raise children's probabilities so each fires at about its Zipfian rate
    corr_rank: int = 25
    corr_scale: float = 0.1
    ortho_steps: int = 100
    ortho_lr: float = 3e-4
    mean_magnitude: tuple[float, float] = (5.0, 4.0)  # linear from the most frequent to the rarest feature
    std_magnitude: tuple[float, float] = (0.5, 0.5)  # folded normal |N(mean, std^2)| per feature
    bias_norm: float = 1.0
    seed: int = 0

    @classmethod
    def synth_16k(cls, seed: int = 0) -> "SynthConfig":
        """SynthSAEBench-16k v2: 16,384 features in 768 dimensions, 128 trees of branching 4 and depth 3,
        all children mutually exclusive and scaled by their parent (the published benchmark world)."""
        return cls(num_features=16384, hidden_dim=768, roots=128, seed=seed)

    def __post_init__(self):
        """Every field checked when the config is made, with its valid range."""
        if self.num_features < 2 or self.hidden_dim < 2:
            raise InputError(f"a world needs at least 2 features and 2 dimensions, got {self.num_features} "
                             f"features in {self.hidden_dim}")
        if not 0 < self.p_min < self.p_max <= 1:
            raise InputError(f"firing probabilities need 0 < p_min < p_max <= 1, got {self.p_min}, {self.p_max}")
        if not self.zipf_exponent > 0:  # 0 makes every rank's probability equal: rescaling it is 0 / 0 (NaN)
            raise InputError(f"zipf_exponent must be > 0 (0.5 in SynthSAEBench), got {self.zipf_exponent}; a world "
                             "with equal firing rates is p_min = p_max, which Zipf's rescaling cannot give")
        if not 0 <= self.mutually_exclusive <= 1:
            raise InputError(f"mutually_exclusive is a share of parents, in [0, 1]; got {self.mutually_exclusive}")
        for name in ("roots", "branching", "depth", "corr_rank", "ortho_steps"):
            if int(getattr(self, name)) < 0 or (name in ("roots", "branching") and int(getattr(self, name)) < 1):
                raise InputError(f"{name} must be {'>= 1' if name in ('roots', 'branching') else '>= 0'}, got "
                                 f"{getattr(self, name)}")
        if self.corr_scale < 0 or self.ortho_lr < 0 or self.bias_norm < 0:
            raise InputError(f"corr_scale, ortho_lr and bias_norm must be >= 0; got {self.corr_scale}, {self.ortho_lr}, "
                             f"{self.bias_norm}")
        if self.corr_rank * self.corr_scale ** 2 >= 1:
            raise InputError(f"corr_rank * corr_scale^2 must stay below 1 (got {self.corr_rank * self.corr_scale ** 2:.2f})")
        self.mean_magnitude = tuple(self.mean_magnitude)
        self.std_magnitude = tuple(self.std_magnitude)
        if len(self.mean_magnitude) != 2 or len(self.std_magnitude) != 2 or min(self.mean_magnitude) <= 0 \
                or min(self.std_magnitude) < 0:
            raise InputError(f"mean_magnitude is (most frequent, rarest) > 0 and std_magnitude two values >= 0; got "
                             f"{self.mean_magnitude}, {self.std_magnitude}")


def _gen(seed: int, device: "str | torch.device" = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def zipf_probabilities(n: int, exponent: float, p_max: float, p_min: float) -> torch.Tensor:
    """``[n]``: ``rank^-exponent`` rescaled linearly onto ``[p_min, p_max]`` (most frequent first)."""
    p = torch.arange(1, n + 1, dtype=torch.float32) ** -exponent
    return p_min + (p_max - p_min) * (p - p.min()) / (p.max() - p.min())


def build_forest(n: int, roots: int, branching: int, depth: int, me_share: float, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hierarchy, breadth first over feature indices: ``parent`` ``[n]`` (-1: none), ``level`` ``[n]``
    (0: root or free feature) and ``exclusive`` ``[n]`` (this feature's children exclude each other)."""
    import random

    parent, level = torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    nxt = min(roots, n)
    frontier, parents = list(range(nxt)), list(range(nxt))
    for d in range(1, depth + 1):
        children = []
        for p in frontier:
            for _ in range(branching):
                if nxt >= n:
                    break
                parent[nxt], level[nxt] = p, d
                children.append(nxt)
                nxt += 1
        if d < depth:
            parents += children
        frontier = children
    has_two = torch.bincount(parent[parent >= 0], minlength=n) >= 2
    eligible = [p for p in parents if has_two[p]]
    exclusive = torch.zeros(n, dtype=torch.bool)
    for i in random.Random(seed).sample(range(len(eligible)), int(len(eligible) * me_share)):
        exclusive[eligible[i]] = True
    return parent, level, exclusive


def compensated(p: torch.Tensor, parent: torch.Tensor, exclusive: torch.Tensor) -> torch.Tensor:
    """``[N]`` probabilities with the hierarchy's losses undone (SynthSAEBench's compensation): a child's
    times ``1 / p(parent)``, and under an exclusive parent times ``1 + (sum of its siblings' p) / p(parent)``."""
    kid = parent >= 0
    par = parent[kid]
    corr = torch.ones_like(p)
    corr[kid] = 1 / p[par]
    excl = kid.clone()
    excl[kid] = exclusive[par]
    sib_sum = torch.zeros_like(p).index_add_(0, parent[excl], p[excl])
    corr[excl] *= 1 + (sib_sum[parent[excl]] - p[excl]).clamp_min(0) / p[parent[excl]]
    return (p * corr).clamp(max=1.0)


def orthogonalize(vectors: torch.Tensor, steps: int, lr: float, chunk: int = 1024) -> torch.Tensor:
    """Unit rows pushed apart by Adam on ``sum_{i != j} (d_i . d_j)^2 + N sum_i (|d_i|^2 - 1)^2``."""
    w = torch.nn.functional.normalize(vectors.detach().clone(), dim=1).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    n = w.shape[0]
    for _ in range(steps):
        opt.zero_grad()
        for s in range(0, n, chunk):
            dots = w[s:s + chunk] @ w.T
            rows = torch.arange(dots.shape[0])
            diag = dots[rows, rows + s]
            (dots.pow(2).sum() - diag.pow(2).sum() + n * (diag - 1).pow(2).sum()).backward()
        opt.step()
    return torch.nn.functional.normalize(w.detach(), dim=1)


@dataclass(repr=False)
class SynthWorld(Result):
    """A built world: ``features`` ``[N, D]`` (unit rows), ``bias`` ``[D]``, and what drives firing."""

    cfg: SynthConfig
    features: torch.Tensor
    bias: torch.Tensor
    probs: torch.Tensor  # [N] firing probability before the hierarchy (compensated for it when configured)
    mean_mag: torch.Tensor  # [N]
    std_mag: torch.Tensor  # [N]
    corr_factor: torch.Tensor  # [N, rank]
    parent: torch.Tensor  # [N] long, -1 for none
    level: torch.Tensor  # [N] long
    exclusive: torch.Tensor  # [N] bool: this feature's children are mutually exclusive
    #: the world's tensors: what save/load/to carry, and what to_dict leaves out
    TENSORS = ("features", "bias", "probs", "mean_mag", "std_mag", "corr_factor", "parent", "level", "exclusive")
    _skip_in_dict = TENSORS

    @classmethod
    def build(cls, cfg: SynthConfig) -> "SynthWorld":
        """Draw the dictionary, the correlation and the forest from ``cfg.seed`` (the orthogonalisation is
        ``cfg.ortho_steps`` Adam steps over all ``N^2`` pairs: minutes for the 16k world on a CPU)."""
        n, d, s = cfg.num_features, cfg.hidden_dim, cfg.seed
        g = _gen(s + _DICT)
        feats = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
        bias = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * cfg.bias_norm
        if cfg.ortho_steps:
            feats = orthogonalize(feats, cfg.ortho_steps, cfg.ortho_lr)
        std = (cfg.std_magnitude[0] + cfg.std_magnitude[1] * torch.randn(n, generator=_gen(s + _STD))).abs()
        factor = torch.randn(n, cfg.corr_rank, generator=_gen(s + _CORR)) * cfg.corr_scale
        parent, level, excl = build_forest(n, cfg.roots, cfg.branching, cfg.depth, cfg.mutually_exclusive, s + _TREE)
        probs = zipf_probabilities(n, cfg.zipf_exponent, cfg.p_max, cfg.p_min)
        if cfg.compensate:
            probs = compensated(probs, parent, excl)
        return cls(cfg, feats, bias, probs,
                   torch.linspace(*cfg.mean_magnitude, n), std, factor, parent, level, excl)

    def to(self, device: "str | torch.device") -> "SynthWorld":
        """The same world with its tensors on ``device`` (samples are then drawn there)."""
        return SynthWorld(self.cfg, **{k: getattr(self, k).to(device) for k in self.TENSORS})

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def d(self) -> int:
        return self.features.shape[1]

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples: the hidden activations ``[n, D]`` and the true feature activations ``[n, N]``."""
        a = self.feature_acts(n, gen)
        return a @ self.features + self.bias, a

    def feature_acts(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``[n, N]`` true feature activations: copula firing, magnitudes, then the hierarchy."""
        f = self.corr_factor
        diag = (1 - f.pow(2).sum(1)).clamp_min(0).sqrt()
        dev = f.device
        g = torch.randn(n, f.shape[0], generator=gen, device=dev).mul_(diag).addmm_(
            torch.randn(n, f.shape[1], generator=gen, device=dev), f.T)
        rows, cols = (g > math.sqrt(2) * torch.erfinv(1 - 2 * self.probs)).nonzero(as_tuple=True)
        del g
        a = torch.zeros(n, f.shape[0], device=dev)
        a[rows, cols] = (self.mean_mag[cols] + self.std_mag[cols] * torch.randn(cols.numel(), generator=gen,
                                                                                  device=dev)).relu()
        return self._apply_hierarchy(a, gen)

    def _levels(self) -> list[tuple]:
        """Per level below the roots, once: its features (a slice when contiguous, as breadth-first numbering
        makes them), their parents, each one's sibling group, whether that group is exclusive, the parents' means."""
        if getattr(self, "_level_cache", None) is None:
            out = []
            for lv in range(1, int(self.level.max()) + 1):
                kids = (self.level == lv).nonzero().flatten()
                if not kids.numel():
                    continue
                contiguous = int(kids[-1] - kids[0]) + 1 == kids.numel()
                par = self.parent[kids]
                groups = torch.unique(par, return_inverse=True)[1]
                out.append((slice(int(kids[0]), int(kids[-1]) + 1) if contiguous else kids, par, groups,
                            int(groups.max()) + 1, self.exclusive[par], self.mean_mag[par]))
            self._level_cache = out
        return self._level_cache

    def _apply_hierarchy(self, a: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Level by level: siblings under an active exclusive parent keep one firing child at random; then
        every child is gated by its parent (scaled by ``parent / parent's mean`` when configured)."""
        for kids, par, groups, n_groups, excl, par_mean in self._levels():
            pa = a.index_select(1, par)
            sub = a[:, kids] if isinstance(kids, slice) else a.index_select(1, kids)
            r, c = ((sub > 0) & (pa > 0) & excl).nonzero(as_tuple=True)
            if r.numel():  # one random winner per (sample, exclusive parent) among the children that fired
                key = r * n_groups + groups[c]
                score = torch.rand(r.numel(), generator=gen, device=a.device)
                best = torch.full((a.shape[0] * n_groups,), -1.0, device=a.device).scatter_reduce(0, key, score, "amax")
                lose = score < best[key]
                sub[r[lose], c[lose]] = 0.0
            if self.cfg.scale_children_by_parent:
                sub.mul_(pa.div_(par_mean))  # zero where the parent is silent
            else:
                sub.mul_(pa > 0)
            if not isinstance(kids, slice):
                a[:, kids] = sub
        return a

    def true_l0(self, n: int = 20_000, seed: int = 0) -> float:
        """Mean number of features active per sample (measured on ``n`` samples)."""
        return float((self.feature_acts(n, _gen(seed, self.features.device)) > 0).sum(1).float().mean())

    def save(self, path: "str | Path") -> Path:
        """The world as safetensors (tensors) with its config in the metadata."""
        import json

        from safetensors.torch import save as st_save

        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in self.TENSORS}
        return atomic_write(path, st_save(tensors, metadata={"config": json.dumps(asdict(self.cfg))}))

    @classmethod
    def load(cls, path: "str | Path") -> "SynthWorld":
        """A world saved by :meth:`save` (or exported from SAELens's SyntheticModel by the bench)."""
        import json

        tensors, meta = read_safetensors(path, "a synthetic world", with_metadata=True)
        missing = [k for k in cls.TENSORS if k not in tensors]
        if missing or "config" not in meta:
            raise InputError(f"{path} is not a synthetic world: it lacks {missing or ['the config metadata']}")
        return cls(SynthConfig(**json.loads(meta["config"])), **{k: tensors[k] for k in cls.TENSORS})

    def summary(self) -> str:
        c = self.cfg
        n_tree = int(((self.parent >= 0) | (torch.bincount(self.parent[self.parent >= 0],
                                                            minlength=self.n_features) > 0)).sum())
        return (f"synthetic world: {self.n_features} features in {self.d} dimensions; Zipfian firing "
                f"(exponent {c.zipf_exponent}, {c.p_min:g} to {c.p_max:g}); {n_tree} features in {c.roots} trees "
                f"(branching {c.branching}, depth {c.depth}, {c.mutually_exclusive:.0%} mutually exclusive"
                f"{', children scaled by parent' if c.scale_children_by_parent else ''}); low-rank correlation "
                f"(rank {c.corr_rank}, scale {c.corr_scale}); seed {c.seed}")


class WorldSource:
    """An endless :class:`~mechscope.sae.data.ActivationSource` of fresh samples from a world (no sample
    is seen twice, as in SynthSAEBench's runner); its generator state makes resume exact. Train through
    :func:`train_on_world`, or give ``fit_sae`` a seed other than the world's: an SAE seeded like the world
    starts with the world's features as its decoder."""

    def __init__(self, world: SynthWorld, batch_size: int, seed: int = 0):
        self.world, self.batch_size, self.seed = world, batch_size, seed
        self.d_in = world.d
        self.gen = _gen(10_000 + seed, world.features.device)

    def __iter__(self) -> "WorldSource":
        return self

    def __next__(self) -> torch.Tensor:
        return self.world.sample(self.batch_size, self.gen)[0]

    def sample(self, n: int) -> torch.Tensor:
        return self.world.sample(n, _gen(20_000 + self.seed, self.world.features.device))[0]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def linear_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A minimum-cost one-to-one match of the rows of ``cost`` ``[n, m]`` (``n <= m`` after transposing)
    to columns: the shortest-augmenting-path Hungarian algorithm (Kuhn 1955; Jonker & Volgenant 1987),
    ``O(n^2 m)``, vectorised over columns. Returns ``(rows, cols)`` sorted by row, like SciPy's."""
    c = np.asarray(cost, dtype=np.float64)
    flip = c.shape[0] > c.shape[1]
    if flip:
        c = c.T
    n, m = c.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    match = np.zeros(m + 1, dtype=np.int64)  # match[j]: the row (1-based) holding column j; 0 is the root
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            cur = c[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    cols = np.nonzero(match[1:])[0]
    rows = match[1:][cols] - 1
    if flip:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def _abs_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.detach().float(), b.detach().float()
    return (torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T).abs()


def mcc(decoder: torch.Tensor, features: torch.Tensor) -> float:
    """Mean |cosine| over a one-to-one Hungarian match of decoder rows ``[L, D]`` to true features ``[N, D]``."""
    cos = _abs_cos(decoder, features).cpu()
    r, c = linear_assignment(1 - cos.numpy())
    return float(cos[torch.as_tensor(r), torch.as_tensor(c)].mean())


def uniqueness(decoder: torch.Tensor, features: torch.Tensor) -> float:
    """Distinct best-matching true features over the number of latents (1: every latent its own feature)."""
    return len(_abs_cos(decoder, features).argmax(1).unique()) / decoder.shape[0]


@dataclass(repr=False)
class SynthEval(Result):
    """An SAE judged against a world's ground truth, on ``n_samples`` fresh samples."""

    mcc: float
    f1: float
    precision: float
    recall: float
    uniqueness: float
    explained_variance: float
    l0: float
    true_l0: float
    dead: int
    shrinkage: float
    n_samples: int
    d_sae: int
    architecture: str = ""
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.architecture or 'SAE'} ({self.d_sae} latents) against the world's ground truth, on "
                f"{self.n_samples} fresh samples:\n"
                f"  F1 (each latent as a detector of its best-matching feature, mean over latents) {self.f1:.3f} "
                f"(precision {self.precision:.3f}, recall {self.recall:.3f})\n"
                f"  MCC (mean |cosine| of the one-to-one Hungarian match, decoder to features) {self.mcc:.3f}\n"
                f"  uniqueness (distinct best matches / latents) {self.uniqueness:.3f}\n"
                f"  explained variance {self.explained_variance:.3f}; L0 {self.l0:.1f} (the world's {self.true_l0:.1f}); "
                f"dead latents {self.dead}; shrinkage (mean ||x_hat|| / ||x||) {self.shrinkage:.3f}")


@torch.no_grad()
def evaluate_on_world(sae: SAE, world: SynthWorld, n_samples: int = 100_000, seed: int = 1,
                      chunk: int = 4096) -> SynthEval:
    """Ground-truth metrics of ``sae`` on ``n_samples`` fresh samples (SynthSAEBench's definitions)."""
    if int(n_samples) < 1 or int(chunk) < 1:
        raise InputError(f"n_samples and chunk must be at least 1, got {n_samples} and {chunk}")
    if sae.cfg.d_in != world.d:
        raise InputError(f"the SAE reads {sae.cfg.d_in} dimensions, the world has {world.d}")
    dec = sae.W_dec.detach().float().to(world.features.device)
    best = _abs_cos(dec, world.features).argmax(1)  # [L] each latent's best-matching feature
    tp = fp = fn = 0
    l0 = tl0 = shrink = 0.0
    n_norm = 0  # samples with a nonzero input (shrinkage is undefined at ||x|| = 0, as SAELens skips them)
    fired = torch.zeros(dec.shape[0], dtype=torch.bool, device=dec.device)
    gen = _gen(30_000 + seed, world.features.device)
    ev = StreamedExplainedVariance()  # not the samples and reconstructions: 2 x n x d floats, 614 MB at 100k x 768
    for s in range(0, n_samples, chunk):
        x, a = world.sample(min(chunk, n_samples - s), gen)
        f = sae.encode(x)
        r = sae.decode(f)
        on, truth = f != 0, a[:, best] > 0
        tp, fp, fn = tp + (on & truth).sum(0), fp + (on & ~truth).sum(0), fn + (~on & truth).sum(0)
        l0, tl0 = l0 + float(on.sum()), tl0 + float((a > 0).sum())
        fired |= on.any(0)
        xn = x.norm(dim=1)
        ok = xn > 1e-6
        shrink += float((r.norm(dim=1)[ok] / xn[ok]).sum())
        n_norm += int(ok.sum())
        ev.add(x, r)
    tp, fp, fn = tp.double().cpu(), fp.double().cpu(), fn.double().cpu()
    prec = torch.where(tp + fp > 0, tp / (tp + fp), torch.zeros(()))
    rec = torch.where(tp + fn > 0, tp / (tp + fn), torch.zeros(()))
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros(()))
    return SynthEval(mcc(dec, world.features), float(f1.mean()), float(prec.mean()), float(rec.mean()),
                     uniqueness(dec, world.features), ev.value,
                     l0 / n_samples, tl0 / n_samples, int((~fired).sum()), shrink / max(n_norm, 1), n_samples,
                     dec.shape[0], sae.cfg.architecture)


#: mixed into the trainer's seed by :func:`train_on_world`: the world's dictionary and an SAE's initial decoder are
#: both ``randn`` rows from ``torch.Generator().manual_seed(seed)``, so with one seed the SAE would start at the
#: ground truth (its decoder rows equal to the world's first features)
SEED_MIX = 1_000_003


def train_on_world(world: SynthWorld, cfg: SAEConfig, train: "TrainConfig | None" = None, progress: bool = True) -> SAE:
    """Train ``cfg`` on fresh samples from ``world`` (``train.steps x train.batch_size`` samples). The trainer's seed
    is ``train.seed + SEED_MIX`` so that no seed starts the SAE at the world's own dictionary."""
    from dataclasses import replace

    from .train import TrainConfig, fit_sae

    train = train or TrainConfig()
    train = replace(train, seed=train.seed + SEED_MIX)
    return fit_sae(WorldSource(world, train.batch_size, train.seed), cfg, train, progress=progress).sae
