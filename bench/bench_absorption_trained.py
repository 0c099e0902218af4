"""Does the absorption metric see absorption that training produces? A planted feature hierarchy on SmolLM2's own
activations, an SAE trained on it, and mechscope's absorption pipeline (probe, main latents, per-word scores).

SmolLM2-135M's layer-15 activations of 12,000 first-letter words (``absorption``'s prompts) get a planted parent
direction per letter (``alpha`` x the median centred norm) and, for 5 words a letter, a child direction of their
own (``beta`` x that norm); the training stream draws those 130 children 40 % of the time. A child always carries
its parent, so a sparse SAE can save a latent by folding the parent into the child's latent (Chanin et al. 2024,
"A is for Absorption"). The script trains a ReLU SAE with an L1 penalty (or TopK) and prints the absorption
fraction on the children and on the other words: absorption should show on the first and not on the second.

    python bench/bench_absorption_trained.py [--arch relu --l1 5 | --arch topk --k 4] [--steps 1500]
"""

from __future__ import annotations

import argparse
import time

import torch

import mechscope
from mechscope.core.hookpoints import act_name
from mechscope.sae import SAEConfig
from mechscope.sae import suite as S
from mechscope.sae.train import TrainConfig, fit_sae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="relu", choices=("relu", "topk"))
    ap.add_argument("--l1", type=float, default=5.0)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5, help="the parent's size, x the median centred norm")
    ap.add_argument("--beta", type=float, default=1.0, help="a child's size, x the median centred norm")
    ap.add_argument("--steps", type=int, default=1500)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = mechscope.load("smollm2-135m")
    hook = act_name("resid_post", 15)
    vocab = S.single_token_words(model.tokenizer)
    words = S.first_letter_words(model.tokenizer, 12000, 0, vocab)
    prefix = S._prompt_prefix(model.tokenizer, words, seed=0, vocab=vocab)
    acts = S.acts_after_prefix(model, hook, prefix, torch.tensor([t for t, _ in words]))
    letter = torch.tensor([S.LETTERS.index(w.strip()[0].lower()) for _, w in words])
    n, d = acts.shape
    g = torch.Generator().manual_seed(0)
    scale = float((acts - acts.mean(0)).norm(dim=1).median())
    parent = torch.nn.functional.normalize(torch.randn(26, d, generator=g), dim=1)
    child = torch.zeros(n, d)
    kids = torch.cat([(letter == L).nonzero().flatten()[torch.randperm(int((letter == L).sum()), generator=g)[:5]]
                      for L in range(26) if (letter == L).any()])
    child[kids] = a.beta * scale * torch.nn.functional.normalize(torch.randn(len(kids), d, generator=g), dim=1)

    def planted(rows: torch.Tensor) -> torch.Tensor:
        return acts[rows] + a.alpha * scale * parent[letter[rows]] + child[rows]

    draw = torch.randint(0, n, (200_000,), generator=g)
    pick = torch.rand(200_000, generator=g) < 0.4
    draw[pick] = kids[torch.randint(0, len(kids), (int(pick.sum()),), generator=g)]
    extra = {"l1_coefficient": a.l1} if a.arch == "relu" else {"k": a.k}
    cfg = SAEConfig(d_in=d, d_sae=2048, architecture=a.arch, hook_name=hook,
                    normalize_activations="expected_average_only_in", **extra)
    t0 = time.time()
    sae = fit_sae(planted(draw), cfg, TrainConfig(steps=a.steps, batch_size=512, lr=1e-3), progress=False).sae
    x = planted(torch.arange(n))
    f = sae.encode(x).detach()
    W = sae.write_directions(torch.arange(sae.cfg.d_sae)).detach()
    run = S._absorption_run(x, f, W, letter, 0)
    probes, bias = S.one_vs_rest_probe(x, letter, 26)
    is_kid = torch.zeros(n, dtype=torch.bool)
    is_kid[kids] = True
    on_kids, on_rest, main_fires = [], [], []
    for L, v in run["per_letter"].items():
        li = S.LETTERS.index(L)
        for mask, out in (((letter == li) & is_kid, on_kids), ((letter == li) & ~is_kid, on_rest)):
            rows = mask.nonzero().flatten()
            if len(rows):
                out.append(float(S.absorption_scores(x[rows], f[rows], W, probes[:, li], v["main"])[0].mean()))
        rows = ((letter == li) & is_kid).nonzero().flatten()
        main_fires.append(float((f[rows][:, v["main"]] > 0).any(1).float().mean()))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"{a.arch} SAE ({extra}), {a.steps} steps on 200,000 planted rows in {time.time() - t0:.0f} s; "
          f"{run['letters_used']} letters scored, probe F1 {run['probe_f1']:.3f}")
    print(f"absorption fraction over the probe's true positives (every word): {run['fraction']:.3f}; full absorption "
          f"{run['full']:.3f}")
    print(f"absorption fraction on the {len(kids)} children: {mean(on_kids):.3f}; on the other words (the control): "
          f"{mean(on_rest):.3f}; the main latents fire on {mean(main_fires):.0%} of the children")


if __name__ == "__main__":
    main()
