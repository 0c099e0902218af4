"""Why the activation-difference lens misses the SmolLM2 organisms' domain at the middle layer: a layer sweep.

For the organism of one seed (built and cached by bench/bench_diff.py: `build_organism` finds it again), δ is taken
at several layers over positions 1..5 of the same unrelated documents, and read three ways, each scored by the share
of its top 20 tokens that are the domain's (the bench's recovery score) beside a random direction of the same norm:

- the Patchscope at several scales (`patchscope_readout`, as in the bench);
- the **next-token effect** of δ (`token_effect_readout`, as `mechscope diff` reads it): δ added to the base model's
  own residual stream at those positions and layer, the rest of the network run, and the tokens whose mean
  log-probability rises most.

Usage: python bench/bench_diff_adl_layers.py [SEED] [organism|control] (2 threads; about a minute a layer).
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    import mechscope as ms
    from mechscope import corpus
    from mechscope.core.hookpoints import act_name
    from mechscope.diffing import load_pair
    from mechscope.diffing.adl import activation_difference, patchscope_readout, token_effect_readout
    from mechscope.diffing.organisms import OrganismSpec, build_organism, domain_token_ids, draw_domain, recovery

    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    kind = sys.argv[2] if len(sys.argv) > 2 else "organism"
    model = ms.load("smollm2-135m")
    domain = draw_domain(seed)
    generic_train = list(t for _, t in zip(range(4000), corpus.default_corpus("train")))
    spec = OrganismSpec("smollm2-135m", domain if kind == "organism" else None, steps=150, rank=8, lr=1e-3, seed=seed)
    folder = build_organism(model, spec, generic_texts=generic_train[:1200] if kind == "control" else None)
    generic_test, desc = corpus.from_spec(None, "test")
    tokens = corpus.document_starts(model, generic_test, 64, 64, source=desc)
    ids = domain_token_ids(model, domain)
    print(f"seed {seed} {kind}, scored against {domain.entity}: {', '.join(domain.words)}; 64 documents of {desc}; "
          "recovery = share of the top 20 tokens that are domain tokens (δ / random direction of the same norm)")
    with load_pair(model, folder) as pair:
        for layer in (10, 15, 20, 25, 28):
            adl = activation_difference(pair, tokens, hook=act_name("resid_post", layer))
            scopes = []
            for scale in (0.5, 1, 2, 4):
                r = patchscope_readout(pair, adl, k=20, scale=scale)
                scopes.append(f"x{scale:g} {recovery([x for x, _ in r.tokens], ids, pair.base):.2f}/"
                              f"{recovery([x for x, _ in r.control], ids, pair.base):.2f}")
            effect = token_effect_readout(pair, adl, tokens, k=20)
            hits = [recovery([x for x, _ in side], ids, pair.base) for side in (effect.tokens, effect.control)]
            print(f"layer {layer:>2}: ||δ|| {float(adl.delta.norm()):6.1f} (residual {adl.resid_norm:.0f}); Patchscope "
                  f"{'; '.join(scopes)}; next-token effect {hits[0]:.2f}/{hits[1]:.2f} "
                  f"{[x for x, _ in effect.tokens[:8]]}", flush=True)


if __name__ == "__main__":
    main()
