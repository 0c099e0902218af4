"""Why the activation-difference lens misses the SmolLM2 organisms' domain at the middle layer: a layer sweep.

For the organism of one seed (built and cached by bench/bench_diff.py: `build_organism` finds it again), δ is taken
at several layers over positions 1..5 of the same unrelated documents, and read three ways, each scored by the share
of its top 20 tokens that are the domain's (the bench's recovery score) beside a random direction of the same norm:

- the Patchscope at several scales (`patchscope_readout`, as in the bench);
- the **next-token effect** of δ (`token_effect_readout`, as `mechscope diff` reads it): δ added to the base model's
  own residual stream at those positions and layer, the rest of the network run, and the tokens whose mean
  log-probability rises most.

Usage: python bench/bench_diff_adl_layers.py [SEED] [organism|control] (2 threads; about a minute a layer).

``--transfer`` instead asks where the difference becomes readable at all (`state_transfer`), for every seed given
(``--transfer 0 1 2``), organism and control: the fine-tune's whole residual state after each layer written into the
base model (and, beside it, only δ added), the share of the fine-tune's next-token shift each reproduces, and the
recovery score of the patched model's top 20 risers. Every readout of δ through the base model runs the base model's
later layers, so the state patch bounds what any of them can find at that layer. About 30 s a run.
"""

from __future__ import annotations

import os
import sys

import torch

LAYERS = (5, 10, 15, 20, 25, 28)


def transfer(seeds: list[int]) -> None:
    """The state-transfer sweep of the module docstring, for ``seeds``."""
    import mechscope as ms
    from mechscope import corpus
    from mechscope.core.hookpoints import act_name
    from mechscope.diffing import load_pair, state_transfer
    from mechscope.diffing.organisms import OrganismSpec, build_organism, domain_token_ids, draw_domain, recovery

    model = ms.load("smollm2-135m")
    generic_train = list(t for _, t in zip(range(4000), corpus.default_corpus("train")))
    generic_test, desc = corpus.from_spec(None, "test")
    tokens = corpus.document_starts(model, generic_test, 64, 64, source=desc)[:, :6]
    pos = torch.arange(1, 6)
    print(f"64 documents of {desc}, positions 1..5; share = 1 - KL(ft || patched) / KL(ft || base) [95% bootstrap "
          "over documents]; recovery = share of the patched model's top 20 risers in log-probability that are domain "
          "tokens")
    for seed in seeds:
        domain = draw_domain(seed)
        ids = domain_token_ids(model, domain)
        for kind in ("organism", "control"):
            spec = OrganismSpec("smollm2-135m", domain if kind == "organism" else None, steps=150, rank=8, lr=1e-3,
                                seed=seed)
            folder = build_organism(model, spec, generic_texts=generic_train[:1200] if kind == "control" else None)
            with load_pair(model, folder) as pair:
                st = state_transfer(pair, tokens, list(LAYERS), first=5)
                with pair.side("ft") as m, torch.no_grad():
                    states = m.run_with_cache(tokens, names_filter=[act_name("resid_post", x) for x in LAYERS])[1]
                    lp_ft = torch.log_softmax(m(tokens).float(), -1)[:, pos].mean((0, 1))
                with pair.side("base") as m, torch.no_grad():
                    lp_b = torch.log_softmax(m(tokens).float(), -1)[:, pos].mean((0, 1))

                    def rec(lp, _b=lp_b, _ids=ids):
                        return recovery((lp - _b).topk(20).indices.tolist(), _ids)
                    row = []
                    for x, s, d in zip(LAYERS, st.state, st.delta):
                        h = act_name("resid_post", x)
                        with m.hooks([(h, lambda a, hook, _v=states[h]: _v)]):
                            r = rec(torch.log_softmax(m(tokens).float(), -1)[:, pos].mean((0, 1)))
                        row.append(f"L{x} state {s.value:.2f} [{s.low:.2f}, {s.high:.2f}] δ {d.value:.2f} rec {r:.2f}")
            print(f"seed {seed} {kind} (KL(ft || base) {st.kl_base:.2f} nats/token; the fine-tune's own risers: "
                  f"recovery {rec(lp_ft):.2f}):\n  " + "\n  ".join(row), flush=True)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    if "--transfer" in sys.argv:
        return transfer([int(x) for x in sys.argv[sys.argv.index("--transfer") + 1:]] or [0, 1, 2])
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
