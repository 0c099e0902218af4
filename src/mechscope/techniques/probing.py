"""Linear probes at every layer, with held-out data and control tasks.

A probe is a linear map from an activation to a label: multinomial logistic regression (cross
entropy + L2, fit with L-BFGS on standardised features) or ridge regression (closed form).
Examples are split into train and held-out by *sequence*, so positions of one text never land
on both sides. Control tasks (Hewitt & Liang 2019, "Designing and Interpreting Probes with
Control Tasks") give every token type a random label drawn from the task's label distribution;
a probe that scores well on them memorises token identity rather than reading the property.
``selectivity = task accuracy - control accuracy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..analysis import viz
from ..analysis.validation import Estimate, bootstrap_ci, paired_bootstrap, shuffled_labels
from ..batching import map_batches
from ..compute import forward_bytes
from ..core.errors import InputError
from ..core.hookpoints import act_name
from ..core.model import HookedModel
from ..core.progress import bar
from ..core.result import Result
from .inputs import stop_layer


@dataclass
class Probe:
    """A fitted linear probe. ``weight`` ``[d, C]`` (logistic) or ``[d, 1]`` (ridge), on standardised inputs."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    n_classes: int

    def decision(self, X: torch.Tensor) -> torch.Tensor:
        return ((X.float() - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        out = self.decision(X)
        return out.argmax(-1) if self.kind == "logistic" else out[..., 0]

    def correct(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example score: 1/0 correctness (logistic) or minus the squared error (ridge)."""
        p = self.predict(X)
        return (p == y).float() if self.kind == "logistic" else -(p - y.float()) ** 2

    def score(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy (logistic) or R^2 (ridge)."""
        if self.kind == "logistic":
            return float(self.correct(X, y).mean())
        y = y.float()
        return float(1 - ((self.predict(X) - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())

    @property
    def direction(self) -> torch.Tensor:
        """``[d_model]`` unit vector in activation space along which the probe reads its (positive) label.

        For binary logistic probes: class 1 minus class 0; for ridge: the regression direction. Un-standardised
        (divided by the feature scale) so it lives in the model's own activation space.
        """
        w = self.weight[:, 1] - self.weight[:, 0] if self.kind == "logistic" and self.n_classes == 2 else self.weight[:, 0]
        if self.kind == "logistic" and self.n_classes != 2:
            raise InputError("a direction is defined for binary logistic probes and ridge probes only")
        v = w / self.std
        return v / v.norm()


def train_probe(X: torch.Tensor, y: torch.Tensor, kind: str = "logistic", l2: float = 1e-3, max_iter: int = 200,
                ) -> Probe:
    """Fit a probe on ``X [n, d]``, ``y [n]`` (class ids for logistic, values for ridge)."""
    if kind not in ("logistic", "ridge"):
        raise InputError(f"kind must be 'logistic' or 'ridge', got {kind!r}")
    if X.shape[0] != y.shape[0]:
        raise InputError(f"X has {X.shape[0]} examples but y has {y.shape[0]}")
    X = X.detach().float().cpu()
    y = y.detach().cpu()
    mean, std = X.mean(0), X.std(0).clamp(min=1e-6)
    Z = (X - mean) / std
    n, d = Z.shape
    if kind == "ridge":
        Zb = torch.cat([Z, torch.ones(n, 1)], 1).double()
        reg = l2 * n * torch.eye(d + 1, dtype=torch.float64)
        reg[-1, -1] = 0
        sol = torch.linalg.solve(Zb.T @ Zb + reg, Zb.T @ y.double()[:, None]).float()
        return Probe("ridge", sol[:-1], sol[-1], mean, std, 1)
    classes = int(y.max()) + 1
    W = torch.zeros(d, classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ W + b, y.long()) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe("logistic", W.detach(), b.detach(), mean, std, classes)


def control_labels(tokens: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang control task: each token type gets one random label, drawn from the task's label
    distribution; positions the task ignores (label < 0) stay ignored."""
    valid = labels >= 0
    pool = labels[valid]
    g = torch.Generator().manual_seed(seed)
    types = tokens.max().item() + 1
    table = pool[torch.randint(0, pool.numel(), (int(types),), generator=g)]
    out = table[tokens]
    out[~valid] = -1
    return out


@dataclass(repr=False)
class ProbeSweep(Result):
    """Held-out probe scores per hook point, with CIs over held-out examples, and the control task."""

    hooks: list[str]
    kind: str
    scores: list[Estimate]
    control: list[Estimate] | None
    selectivity: list[Estimate] | None
    probes: list[Probe] = field(default_factory=list)
    n_train: int = 0
    n_test: int = 0
    task: str = ""

    _skip_in_dict = ("probes",)

    @property
    def best(self) -> int:
        key = self.selectivity if self.selectivity is not None else self.scores
        return max(range(len(key)), key=lambda i: key[i].value)

    def summary(self) -> str:
        metric = ("accuracy (fraction correct)" if self.kind == "logistic" else "minus squared error")
        lines = [f"{self.kind} probe{' for ' + self.task if self.task else ''}: held-out {metric} "
                 f"({self.n_train} train / {self.n_test} held-out examples, split by sequence)"]
        for i, h in enumerate(self.hooks):
            row = f"  {h:32s} {self.scores[i].value:.3f} [{self.scores[i].low:.3f}, {self.scores[i].high:.3f}]"
            if self.control is not None:
                row += (f"  control-task {('accuracy' if self.kind == 'logistic' else 'score')} "
                        f"{self.control[i].value:.3f}  selectivity (task - control) {self.selectivity[i].value:+.3f}")
            lines.append(row)
        b = self.best
        if self.selectivity is not None:
            s = self.selectivity[b]
            verdict = "beats its control task" if s.excludes(0.0) and s.value > 0 else "does NOT beat its control task"
            lines.append(f"best: {self.hooks[b]}, selectivity {s}: the probe {verdict}")
        return "\n".join(lines)

    def plot(self, path: str | Path = "probe.png") -> Path:
        x = list(range(len(self.hooks)))
        fig, ax = viz.figure(figsize=(7, 4))
        series = [("task", self.scores)] + ([("control", self.control)] if self.control else [])
        for name, ests in series:
            viz.line_with_band(ax, x, [e.value for e in ests], [e.low for e in ests], [e.high for e in ests], name)
        ax.set_xlabel("hook point (layer)")
        ax.set_ylabel("held-out accuracy" if self.kind == "logistic" else "held-out -MSE")
        ax.legend()
        ax.set_title(f"probe{': ' + self.task if self.task else ''} (95% CI)")
        return viz.save_figure(fig, path)

    def _html_body(self) -> str:
        rows = [torch.tensor([e.value for e in self.scores])]
        names = ["task"]
        if self.control:
            rows += [torch.tensor([e.value for e in self.control]), torch.tensor([e.value for e in self.selectivity])]
            names += ["control", "selectivity"]
        return viz.heatmap_html(torch.stack(rows), names, [str(i) for i in range(len(self.hooks))],
                                title="probe scores by hook point")


def _activations(model: HookedModel, tokens: torch.Tensor, hooks: list[str], batch_size: int | None) -> dict:
    """``{hook: [n, pos, d]}`` (fp32, CPU) for ``tokens [n, pos]``, in memory-sized batches of sequences."""
    stop = stop_layer(model, hooks)  # the blocks past the deepest hook, and the unembedding, never run

    def run(s: int, e: int) -> dict:
        _, cache = model.run_with_cache(tokens[s:e].to(model.device), names_filter=hooks, device="cpu",
                                        stop_at_layer=stop)
        return {h: cache[h].float() for h in hooks}

    elt = torch.finfo(model.dtype).bits // 8
    per = forward_bytes(model.cfg.to_dict(), 1, tokens.shape[1], elt) + len(hooks) * tokens.shape[1] * model.cfg.d_model * 4
    parts = map_batches(run, tokens.shape[0], batch_size, per, model.device, "probe activations",
                        tokens_per_item=tokens.shape[1])
    return {h: torch.cat([p[h] for p in parts]) for h in hooks}


@torch.no_grad()
def probe_sweep(model: HookedModel, tokens: torch.Tensor, labels: torch.Tensor, hooks: Sequence[str] | None = None,
                kind: str = "logistic",
                control: bool | str = True, held_out: float = 0.25, seed: int = 0, l2: float = 1e-3, task: str = "",
                batch_size: int | None = None) -> ProbeSweep:
    """Probe ``labels [n, pos]`` (``-1`` = ignore) from each hook's activations on ``tokens [n, pos]``.

    ``hooks`` defaults to every ``blocks.L.hook_resid_post``. Sequences are split into train and
    held-out; scores carry bootstrap CIs over held-out examples, and with ``control`` the
    Hewitt & Liang control task is fit on the same split (selectivity with a paired CI);
    ``control="shuffled"`` uses shuffled labels instead (:func:`mechscope.validation.shuffled_labels`).
    """
    if tokens.shape != labels.shape:
        raise InputError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} must have the same shape")
    hooks = hooks or [act_name("resid_post", l) for l in range(model.cfg.n_layers)]
    model.manager.resolve(hooks)
    n = tokens.shape[0]
    if n < 4:
        raise InputError("probing needs at least 4 sequences (some are held out)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = max(1, round(n * held_out))
    test_idx, train_idx = perm[:k], perm[k:]
    acts = _activations(model, tokens, hooks, batch_size)
    if control == "shuffled":
        ctrl = shuffled_labels(labels, seed)
    elif control and kind == "logistic":
        ctrl = control_labels(tokens, labels, seed)
    else:
        ctrl = None
    mask = labels >= 0

    def split(x, idx):
        return x[idx][mask[idx]]

    scores, ctl, sel, probes = [], [], [], []
    for h in bar(hooks, desc="probes"):
        A = acts[h]  # [n, pos, d]
        Xtr, Xte = split(A, train_idx), split(A, test_idx)
        ytr, yte = split(labels, train_idx), split(labels, test_idx)
        p = train_probe(Xtr, ytr, kind, l2)
        c_task = p.correct(Xte, yte)
        scores.append(bootstrap_ci(c_task, seed=seed))
        probes.append(p)
        if ctrl is not None:
            pc = train_probe(Xtr, split(ctrl, train_idx), kind, l2)
            c_ctrl = pc.correct(Xte, split(ctrl, test_idx))
            ctl.append(bootstrap_ci(c_ctrl, seed=seed))
            sel.append(paired_bootstrap(c_task, c_ctrl, seed=seed))
    return ProbeSweep(hooks, kind, scores, ctl or None, sel or None, probes,
                      int(mask[train_idx].sum()), int(mask[test_idx].sum()), task)


def next_token_continues_word(model: HookedModel, tokens: torch.Tensor) -> torch.Tensor:
    """Labels ``[n, pos]``: 1 when the *next* token starts without whitespace (it continues the current word
    or punctuation), 0 when it starts a new word; the last position is ignored (-1). A context-dependent
    property for probing the default model."""
    tok = model.tokenizer
    cache: dict[int, int] = {}

    def starts_new(i: int) -> int:
        if i not in cache:
            s = tok.decode([i])
            cache[i] = 1 if (not s or s[0].isspace()) else 0
        return cache[i]

    lab = torch.full(tokens.shape, -1, dtype=torch.long)
    nxt = tokens[:, 1:]
    lab[:, :-1] = torch.tensor([[1 - starts_new(int(t)) for t in row] for row in nxt.tolist()])
    return lab
