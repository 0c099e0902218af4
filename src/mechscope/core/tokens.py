"""Text <-> tokens, with an explicit BOS and padding that carries its attention mask.

``prepend_bos=None`` follows the tokenizer's own default (``cfg.default_prepend_bos``: False
for SmolLM2, True for Gemma), and a BOS already at the start is never doubled. Text batches
are padded (right by default, left for generation) and return their attention mask.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .config import ModelConfig
from .errors import InputError, InputTypeError
from .types import TextOrTokens

Tokens = torch.Tensor  # [batch, pos] int64


class TokenOps:
    """The tokenizer side of a model; ``device()`` says where token tensors go."""

    def __init__(self, tokenizer, cfg: ModelConfig, device: Callable[[], torch.device]):
        self.tokenizer, self.cfg, self._device = tokenizer, cfg, device
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        import warnings

        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def check(self, tokens: Tokens, attention_mask: torch.Tensor | None) -> None:
        """Clear errors for ids outside the vocabulary; a warning (once) past the context or for unmasked padding."""
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.d_vocab)].unique()[:8].tolist()
            raise InputError(f"token ids {bad} are outside the vocabulary: valid ids are 0..{self.cfg.d_vocab - 1}")
        if tokens.shape[-1] > self.cfg.n_ctx:
            self._warn_once("n_ctx", f"mechscope: the input is {tokens.shape[-1]} tokens, longer than the model's context "
                                     f"of {self.cfg.n_ctx}; positions past it are outside what the model was trained on")
        if attention_mask is None and tokens.shape[0] > 1 and self.tokenizer is not None:
            pad = self.pad_token_id
            ends = (tokens[:, -1] == pad)
            if bool(ends.any()) and not bool(ends.all()) and bool((tokens[ends, -2:] == pad).all()):
                self._warn_once("pad", "mechscope: some rows end in padding tokens but no attention_mask was given, so "
                                       "position -1 of those rows is a pad token; pass the mask from model.tokenize(...) "
                                       "or the texts themselves")

    def need_tokenizer(self) -> "PreTrainedTokenizerBase":  # noqa: F821
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        tok = self.need_tokenizer()
        ids = (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), 0)
        return next(c for c in ids if c is not None)

    def encode(self, text: str, prepend_bos: bool | None) -> list[int]:
        """One text -> ids, with BOS per ``prepend_bos`` (never doubled)."""
        tok = self.need_tokenizer()
        if not isinstance(text, str):
            raise InputTypeError(f"text must be a string, got {type(text).__name__} {text!r}")
        ids = tok(text, add_special_tokens=False).input_ids
        if prepend_bos is None:
            prepend_bos = self.cfg.default_prepend_bos
        bos = tok.bos_token_id
        if prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tokenize(self, text: str | Sequence[str], prepend_bos: bool | None = None,
                 padding_side: str | None = None) -> tuple[Tokens, torch.Tensor]:
        """Text (or a list) -> ``(tokens [batch, pos], attention_mask [batch, pos])``, padded (right by default)."""
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, Sequence) and not isinstance(text, (bytes, torch.Tensor)):
            texts = list(text)
        else:
            raise InputTypeError(f"text must be a string or a list of strings, got {type(text).__name__} {text!r:.80}"
                                 + ("; token ids go straight to the model (model(tokens))"
                                    if isinstance(text, torch.Tensor) else ""))
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputTypeError(f"texts {bad[:10]} are not strings (got {type(texts[bad[0]]).__name__} "
                                 f"{texts[bad[0]]!r:.60}); every prompt must be a string")
        if not texts:
            raise InputError("no text given")
        empty = [i for i, t in enumerate(texts) if isinstance(t, str) and not t and not self.cfg.default_prepend_bos]
        if empty:
            raise InputError(f"texts {empty[:10]} are empty: they tokenize to zero tokens (the model prepends no BOS)")
        seqs = [self.encode(t, prepend_bos) for t in texts]
        n = max(len(s) for s in seqs)
        if n == 0:
            raise InputError("the text tokenizes to zero tokens")
        side = padding_side or "right"
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
        tokens = torch.full((len(seqs), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
            tokens[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        return tokens.to(self._device()), mask.to(self._device())

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool | None = None, padding_side: str | None = None) -> Tokens:
        """Text or list of texts -> tokens ``[batch, pos]`` (padded with the pad token; see :meth:`tokenize`)."""
        return self.tokenize(text, prepend_bos=prepend_bos, padding_side=padding_side)[0]

    def to_str_tokens(self, input: str | torch.Tensor | Sequence[int],
                      prepend_bos: bool | None = None) -> list[str] | list[list[str]]:
        """Each token as its string. Text or 1-D tokens give a list; a batch gives a list of lists."""
        tok = self.need_tokenizer()
        if isinstance(input, str):
            return [tok.decode([i]) for i in self.encode(input, prepend_bos)]
        if isinstance(input, torch.Tensor) and input.dim() == 2:
            return [self.to_str_tokens(row) for row in input]
        ids = input.tolist() if isinstance(input, torch.Tensor) else input
        return [tok.decode([int(i)]) for i in ids]

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Tokens ``[pos]`` -> text, or ``[batch, pos]`` -> list of texts."""
        tok = self.need_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        return tok.decode(list(tokens))

    def to_single_token(self, text: str) -> int:
        """The id of ``text`` if it is exactly one token; an error showing its tokenization otherwise."""
        tok = self.need_tokenizer()
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [tok.decode([i]) for i in ids]
            raise InputError(
                f"{text!r} is {len(ids)} tokens, not one: {pieces}. Answers and targets must be single "
                f"tokens; mind the leading space (e.g. ' Paris' vs 'Paris')."
            )
        return ids[0]

    def prepare(self, input: TextOrTokens, attention_mask: torch.Tensor | None, prepend_bos: bool | None,
                padding_side: str | None) -> tuple[Tokens, torch.Tensor | None]:
        """Text, texts or tokens -> ``(tokens [batch, pos] on the device, attention mask or None)``."""
        if isinstance(input, (str, list, tuple)):
            if isinstance(input, (list, tuple)) and input and not isinstance(input[0], str):
                raise InputTypeError("pass tokens as a tensor [batch, pos], or text as a string or list of strings")
            tokens, mask = self.tokenize(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if attention_mask is None and bool((mask == 0).any()):
                attention_mask = mask
            self.check(tokens, attention_mask)
            return tokens, attention_mask
        if not isinstance(input, torch.Tensor):
            raise InputTypeError(f"input must be text, a list of texts or tokens [batch, pos]; got "
                                 f"{type(input).__name__}")
        tokens = input[None] if input.dim() == 1 else input
        if tokens.dim() != 2:
            raise InputError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise InputTypeError(f"tokens must be integer ids, got a {tokens.dtype} tensor")
        tokens = tokens.to(self._device())
        if attention_mask is not None:
            attention_mask = attention_mask.to(self._device())
            if attention_mask.shape != tokens.shape:
                raise InputError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match tokens {tuple(tokens.shape)}"
                )
        self.check(tokens, attention_mask)
        return tokens, attention_mask
