"""Techniques: each takes a model and tensors and returns a result (see :mod:`mechscope.core.result`).

- :mod:`.lens`: logit lens and tuned lens;
- :mod:`.attribution`: direct logit attribution by layer, head and neuron;
- :mod:`.patching`: the batched activation-patching engine; :mod:`.attribution_patching`;
- :mod:`.ablation`: zero/mean/resample ablation with CIs and random baselines;
- :mod:`.probing`: linear probes with control tasks; :mod:`.steering`: steering and projection hooks;
- :mod:`.inputs`: prompt pairs and answer ids shared by all of them.
"""
