"""Circuits: weight-based OV/QK analysis, head detectors, circuit discovery, and a toy with a known answer.

- :mod:`.weights`: OV/QK circuits as factored matrices, composition and copying scores;
- :mod:`.heads`: head detectors and "what does this head do?";
- :mod:`.discovery`: patching + edge attribution (EAP, EAP-IG) + held-out validation;
- :mod:`.toy`: a 2-layer attention-only model that learns induction heads.
"""
