"""Toy models with a known answer: a small attention-only transformer that learns induction.

:func:`train_attn_only` trains a stock Hugging Face GPT-NeoX model (rotary positions, LayerNorm,
sequential residual) whose MLPs are zero and frozen, so every block is attention only and each
MLP writes exactly 0. The training data are periodic random sequences, ``[BOS] s s s ...`` with a
random segment ``s`` of random length. The period changes from sequence to sequence, so no
fixed positional offset predicts the next token; the model has to find the earlier copy of the
current token and read what followed it. With two layers it does so with the circuit Olsson et
al. 2022 ("In-context learning and induction heads") describe: a previous-token head in layer 0
whose output the induction head in layer 1 reads through its keys (K-composition; Elhage et al.
2021, "A mathematical framework for transformer circuits"). That is the known answer the head
detectors, composition scores and ablations are checked against.

The model stays an ordinary HF model with a word-level tokenizer (``<bos>``, ``<unk>``, ``t2`` ...
``t{d_vocab-1}``), so :meth:`ToyRun.save` writes a folder that :func:`mechscope.load` reads.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import InputError
from ..core.files import atomic_dir
from ..core.model import HookedModel
from ..core.progress import bar as progress_bar
from ..core.result import Result

BOS, UNK, FIRST_TOKEN = 0, 1, 2


def periodic_sequences(batch: int, n_ctx: int, d_vocab: int, periods: tuple[int, int],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch, n_ctx]`` rows ``[BOS] s s s ...``: ``s`` uniform over ``t2..t{d_vocab-1}``,
    ``len(s)`` uniform in ``periods`` (inclusive).

    ``x[b, 1 + t] = s_b[t mod p_b]``; every token after the first period is predictable by induction.
    """
    lo, hi = periods
    p = torch.randint(lo, hi + 1, (batch, 1), generator=generator)
    seg = torch.randint(FIRST_TOKEN, d_vocab, (batch, hi), generator=generator)
    idx = torch.arange(n_ctx - 1)[None] % p
    return torch.cat([torch.full((batch, 1), BOS), seg.gather(1, idx)], 1)


def toy_tokenizer(d_vocab: int) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A word-level tokenizer for the toy vocabulary: ``<bos>`` (0), ``<unk>`` (1), ``t2`` ... ``t{d_vocab-1}``;
    BOS is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": BOS, "<unk>": UNK, **{f"t{i}": i for i in range(FIRST_TOKEN, d_vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>",
                                   eos_token="<bos>", pad_token="<bos>")


@dataclass(repr=False)
class ToyRun(Result):
    """A trained toy model, its per-step training loss and the settings it was trained with."""

    model: HookedModel
    losses: list[float]
    config: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False  # read back from $MECHSCOPE_CACHE/toys (trained earlier with the same settings)

    _skip_in_dict = ("model", "losses")

    def summary(self) -> str:
        c = self.config
        k = max(1, len(self.losses) // 20)
        first, last = sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k
        return (f"attention-only toy: {c['n_layers']} layers x {c['n_heads']} heads, d_model {c['d_model']}, "
                f"vocab {c['d_vocab']}, context {c['n_ctx']}, periods {c['periods'][0]}-{c['periods'][1]}\n"
                f"  {c['steps']} steps in {self.seconds:.1f} s{' (read from the cache)' if self.cached else ''}; "
                f"loss {first:.3f} -> {last:.3f} "
                f"(the first period of each sequence cannot be predicted)")

    def _dict_extra(self) -> dict:
        return {"final_loss": self.losses[-1] if self.losses else None}

    def save(self, path: str | Path) -> Path:
        """Write the HF model and tokenizer to ``path`` (safetensors); ``mechscope.load(path)`` reads it back."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.model.hf.save_pretrained(tmp)
            self.model.tokenizer.save_pretrained(tmp)
        return path


def attn_only_neox(n_layers: int, n_heads: int, d_model: int, d_vocab: int, n_ctx: int) -> torch.nn.Module:
    """A stock HF GPT-NeoX (sequential residual, full rotary) whose MLPs are zero and frozen."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=d_vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                        num_attention_heads=n_heads, intermediate_size=1, max_position_embeddings=n_ctx,
                        rotary_pct=1.0, use_parallel_residual=False, hidden_dropout=0.0, attention_dropout=0.0,
                        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=BOS)
    hf = GPTNeoXForCausalLM(cfg)
    for layer in hf.gpt_neox.layers:  # attention only: each MLP is zero and never trained
        for p in layer.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    return hf


def _fit(hf, steps: int, batch: int, n_ctx: int, d_vocab: int, periods, lr: float, weight_decay: float, seed: int,
         progress: bool) -> list[float]:
    """AdamW on the next-token loss of periodic sequences; returns the loss of every step."""
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    hf.train()
    bar = None
    if progress:
        bar = progress_bar(total=steps, desc="train_attn_only")
    for _ in range(steps):
        x = periodic_sequences(batch, n_ctx, d_vocab, periods, gen)
        loss = hf(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    return losses


def train_attn_only(n_layers: int = 2, n_heads: int = 2, d_model: int = 64, d_vocab: int = 64,
                    n_ctx: int = 48, periods: tuple[int, int] | None = None, steps: int = 800,
                    batch: int = 64, lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0,
                    progress: bool = False, cache: bool = True) -> ToyRun:
    """Train an attention-only transformer on periodic random sequences; see the module docstring.

    Loss: mean next-token cross-entropy ``-log p(x_{t+1} | x_{<=t})`` over all positions, AdamW.
    ``periods`` defaults to ``(4, (n_ctx - 1) // 2)`` so that ``[BOS] A A`` prompts of the default
    detector length lie inside the training distribution. The defaults train in about 20 s on
    one CPU core. Measured over five seeds, they give one previous-token head in layer 0 (score
    0.77-0.85; the other head <= 0.22), two induction heads in layer 1 (0.85-0.96), and the
    highest K-composition pair joins the two. With ``n_heads=4`` the work is shared out: two or
    three layer-0 heads attend to the previous token and every layer-1 head is an induction head.
    ``n_layers=1`` cannot form an induction head (there is no earlier head to compose with).

    ``cache``: the trained toy is kept under ``$MECHSCOPE_CACHE/toys`` by its settings (safetensors, with its
    losses), and a later call with the same settings reads it back instead of training again (``cached`` says so);
    a seed's training is deterministic, so that is the model this call would train (tested).
    """
    if n_layers < 1 or n_heads < 1 or d_model % n_heads or (d_model // n_heads) % 2:
        raise InputError(f"need n_layers >= 1 and an even d_head = d_model / n_heads; got n_layers={n_layers}, "
                         f"d_model={d_model}, n_heads={n_heads}")
    if d_vocab < 8:
        raise InputError(f"d_vocab must be at least 8 (two special tokens and the random ones), got {d_vocab}")
    periods = tuple(periods or (4, (n_ctx - 1) // 2))
    if not 1 <= periods[0] <= periods[1] or 2 * periods[1] > n_ctx - 1:
        raise InputError(f"periods must satisfy 1 <= low <= high and 2 * high <= n_ctx - 1 = {n_ctx - 1} "
                         f"(each sequence holds at least two periods); got {periods}")
    config = dict(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_vocab=d_vocab, n_ctx=n_ctx,
                  periods=list(periods), steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, seed=seed)
    folder = _cache_folder(config) if cache else None
    if folder is not None and (folder / TOY_FILE).is_file():
        return _load_cached(folder, config)
    torch.manual_seed(seed)
    hf = attn_only_neox(n_layers, n_heads, d_model, d_vocab, n_ctx)
    t0 = time.perf_counter()
    losses = _fit(hf, steps, batch, n_ctx, d_vocab, periods, lr, weight_decay, seed, progress)
    seconds = time.perf_counter() - t0
    hf.eval()
    run = ToyRun(HookedModel(hf, toy_tokenizer(d_vocab), name=f"attn-only-{n_layers}L"), losses, config, seconds)
    if folder is not None:
        with atomic_dir(folder, replace=False) as tmp:  # another process may have written it meanwhile: kept
            run.save(tmp / "model")
            (tmp / TOY_FILE).write_text(json.dumps({"config": config, "losses": losses, "seconds": seconds}))
    return run


#: the file beside a cached toy's model folder: its settings, losses and training time
TOY_FILE = "toy.json"


def _cache_folder(config: dict) -> Path:
    """Where :func:`train_attn_only` keeps a toy trained with ``config``: named by a hash of the settings."""
    from ..loading import cache_dir

    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "toys" / f"attn-only-{key}"


def _load_cached(folder: Path, config: dict) -> ToyRun:
    """The toy :func:`train_attn_only` saved in ``folder`` (safetensors only), its MLPs zero and frozen again."""
    from transformers import GPTNeoXForCausalLM

    saved = json.loads((folder / TOY_FILE).read_text())
    if saved["config"] != config:
        raise InputError(f"the cached toy in {folder} was trained with other settings: delete the folder")
    hf = GPTNeoXForCausalLM.from_pretrained(folder / "model", use_safetensors=True).eval()
    for layer in hf.gpt_neox.layers:
        layer.mlp.requires_grad_(False)
    model = HookedModel(hf, toy_tokenizer(config["d_vocab"]), name=f"attn-only-{config['n_layers']}L")
    return ToyRun(model, saved["losses"], config, saved["seconds"], cached=True)
