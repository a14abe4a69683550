"""Prompts -> token ids (the pipeline folder's own tokenizers) and prompt embeddings that can be saved and reloaded.

Tokenization is not reimplemented: :class:`Tokenizer` reads the folder's ``tokenizer.json`` with the ``tokenizers``
library (the Rust tokenizer transformers' fast tokenizers wrap: the same ids, truncation and padding as diffusers'
FluxPipeline) and falls back to ``transformers`` only for folders without one (e.g. a CLIP ``vocab.json`` +
``merges.txt``). So prompt commands do not import transformers (nor its warning about a missing PyTorch).

Like FluxPipeline, prompts are padded to a fixed length (CLIP: the tokenizer's ``model_max_length``, 77; T5:
``max_sequence_length``, 512 by default) and longer prompts are truncated with a :class:`PromptTruncatedWarning`
naming the removed text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.io.safetensors import SafetensorsFile, save_file

__all__ = ["Tokenizer", "PromptTruncatedWarning", "PromptEmbeddings", "as_prompt_list", "check_text_inputs"]

EMBEDDINGS_FORMAT = "pqjax.prompt_embeddings"
#: tensor names of an embeddings file: PromptEmbeddings' own, or the transformer's argument names
EMBEDDING_NAMES = (("prompt_embeds", "pooled_prompt_embeds"), ("encoder_hidden_states", "pooled_projections"))


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the encoder's maximum sequence length and was cut (as diffusers does)."""


def as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.200}")
    return list(prompts)


class Tokenizer:
    """One tokenizer of a FLUX pipeline folder (``tokenizer/`` for CLIP, ``tokenizer_2/`` for T5).

    ``vocab_size``: base vocabulary (without added tokens), what the encoder's embedding must cover;
    ``model_max_length``: the tokenizer's configured maximum (CLIP's sequence length in FluxPipeline).
    """

    def __init__(self, folder: str, backend, kind: str, vocab_size: int, model_max_length: int,
                 pad_token: str | None = None, pad_id: int | None = None):
        self.folder, self.kind = folder, kind
        self.vocab_size, self.model_max_length = int(vocab_size), int(model_max_length)
        self._tok, self._pad_token, self._pad_id = backend, pad_token, pad_id

    def __repr__(self):
        return (f"Tokenizer({os.path.basename(self.folder)!r}, {self.kind}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length})")

    @classmethod
    def from_folder(cls, folder, class_name: str | None = None, backend: str = "auto") -> "Tokenizer":
        """Load ``tokenizer.json`` with ``tokenizers`` (``backend="auto"`` when the file exists, or
        ``"tokenizers"``), else with transformers (``class_name`` from model_index.json, else ``AutoTokenizer``)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"{folder}: no such tokenizer folder")
        if backend not in ("auto", "transformers", "tokenizers"):
            raise ValueError(f"backend must be 'auto', 'transformers' or 'tokenizers', got {backend!r}")
        if backend == "auto" and os.path.isfile(os.path.join(folder, "tokenizer.json")):
            backend = "tokenizers"
        if backend != "tokenizers":
            try:
                import transformers
            except ImportError:
                if backend == "transformers":
                    raise
            else:
                return cls._from_transformers(folder, class_name, transformers)
        return cls._from_tokenizers(folder)

    @classmethod
    def _from_transformers(cls, folder, class_name, transformers):
        tok_cls = getattr(transformers, class_name, None) if class_name else None
        tok_cls = tok_cls or transformers.AutoTokenizer
        try:
            tok = tok_cls.from_pretrained(folder)
        except Exception as e:  # transformers raises OSError/ValueError/TypeError/... for unusable folders
            raise ValueError(f"{folder}: cannot load the tokenizer with transformers.{tok_cls.__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        return cls(folder, tok, "transformers", tok.vocab_size, tok.model_max_length)

    @classmethod
    def _from_tokenizers(cls, folder):
        from tokenizers import Tokenizer as RustTokenizer

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"{folder}: no tokenizer.json; without transformers installed only tokenizer.json "
                             "folders can be read (pip install transformers)")
        tok = RustTokenizer.from_file(path)
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, like transformers
            p = os.path.join(folder, name)
            if os.path.isfile(p):
                with open(p) as f:
                    cfg.update(json.load(f))
        pad = cfg.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = tok.token_to_id(pad) if pad is not None else None
        if pad_id is None:
            raise ValueError(f"{folder}: tokenizer has no usable pad_token ({pad!r}) in tokenizer_config.json")
        max_len = int(cfg.get("model_max_length") or int(1e30))
        return cls(folder, tok, "tokenizers", tok.get_vocab_size(with_added_tokens=False), max_len, pad, pad_id)

    # ------------------------------------------------------------------------------------------

    def _ids(self, prompts: list[str], max_length: int | None) -> list[list[int]]:
        if self.kind == "transformers":
            if max_length is None:
                return self._tok(prompts, padding=False, truncation=False, verbose=False).input_ids
            return self._tok(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids
        tok = self._tok
        if max_length is None:
            tok.no_truncation()
            tok.no_padding()
        else:
            tok.enable_truncation(max_length)
            tok.enable_padding(length=max_length, pad_id=self._pad_id, pad_token=self._pad_token)
        return [e.ids for e in tok.encode_batch(prompts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)  # same call in both backends

    def __call__(self, prompts, max_length: int) -> np.ndarray:
        """Token ids ``[B, max_length]`` int32: padded to ``max_length``, truncated (with a warning) beyond it."""
        prompts = as_prompt_list(prompts)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        ids = np.asarray(self._ids(prompts, max_length), np.int32)
        for i, full in enumerate(self._ids(prompts, None)):
            if len(full) > max_length:
                removed = self.decode(full[max_length - 1:])
                warnings.warn(f"{os.path.basename(self.folder)}: prompt {i} has {len(full)} tokens, more than the "
                              f"maximum of {max_length}: truncated, dropping {removed!r}",
                              PromptTruncatedWarning, stacklevel=2)
        return ids


@dataclasses.dataclass
class PromptEmbeddings:
    """FLUX's two prompt embeddings for a batch of prompts.

    ``prompt_embeds [B, L, joint_attention_dim]``: T5's last hidden state (the transformer's
    ``encoder_hidden_states``); ``pooled_prompt_embeds [B, pooled_projection_dim]``: CLIP's pooled output
    (``pooled_projections``). Encode a calibration set once, :meth:`save`, and :meth:`load` it for every run, e.g.
    ``pqjax.CalibBatch(encoder_hidden_states=e.prompt_embeds, pooled_projections=e.pooled_prompt_embeds)``.
    """

    prompt_embeds: jax.Array
    pooled_prompt_embeds: jax.Array
    prompts: list[str] | None = None

    def __post_init__(self):
        s, p = tuple(np.shape(self.prompt_embeds)), tuple(np.shape(self.pooled_prompt_embeds))
        if len(s) != 3 or len(p) != 2 or s[0] != p[0]:
            raise ValueError(f"PromptEmbeddings: expected prompt_embeds [B, L, D] and pooled_prompt_embeds [B, P] "
                             f"with the same B, got {s} and {p}")
        if self.prompts is not None and len(self.prompts) != s[0]:
            raise ValueError(f"PromptEmbeddings: {len(self.prompts)} prompts for {s[0]} embeddings")

    def __len__(self) -> int:
        return int(np.shape(self.prompt_embeds)[0])

    def __getitem__(self, idx) -> "PromptEmbeddings":
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        if not isinstance(idx, slice):
            raise TypeError("PromptEmbeddings can be indexed with an int or a slice")
        return PromptEmbeddings(self.prompt_embeds[idx], self.pooled_prompt_embeds[idx],
                                None if self.prompts is None else self.prompts[idx])

    @classmethod
    def concatenate(cls, parts: Sequence["PromptEmbeddings"]) -> "PromptEmbeddings":
        prompts = None if any(p.prompts is None for p in parts) else [s for p in parts for s in p.prompts]
        return cls(jnp.concatenate([jnp.asarray(p.prompt_embeds) for p in parts]),
                   jnp.concatenate([jnp.asarray(p.pooled_prompt_embeds) for p in parts]), prompts)

    def astype(self, dtype) -> "PromptEmbeddings":
        return PromptEmbeddings(jnp.asarray(self.prompt_embeds, dtype), jnp.asarray(self.pooled_prompt_embeds, dtype),
                                self.prompts)

    def check(self, config, origin: str = "") -> "PromptEmbeddings":
        """Raise ValueError unless these embeddings fit the transformer ``config`` (:func:`check_text_inputs`)."""
        check_text_inputs(config, self.prompt_embeds, self.pooled_prompt_embeds, origin=origin)
        return self

    def save(self, path) -> None:
        """Write a ``.safetensors`` file: tensors ``prompt_embeds``, ``pooled_prompt_embeds`` (their dtype, bf16
        included) and the prompts as JSON in the metadata."""
        meta = {"format": EMBEDDINGS_FORMAT, "version": "1"}
        if self.prompts is not None:
            meta["prompts"] = json.dumps(self.prompts)
        save_file(path, {"prompt_embeds": np.asarray(self.prompt_embeds),
                         "pooled_prompt_embeds": np.asarray(self.pooled_prompt_embeds)}, meta)

    @classmethod
    def load(cls, path, dtype=None) -> "PromptEmbeddings":
        """Read a file written by :meth:`save`, or any safetensors file holding ``encoder_hidden_states [B, T, J]``
        + ``pooled_projections [B, P]`` (the transformer's argument names); optionally converting to ``dtype``."""
        f = SafetensorsFile(os.fspath(path))
        names = next((n for n in EMBEDDING_NAMES if set(n) <= set(f.keys())), None)
        fmt = f.metadata.get("format")
        if names is None or (fmt not in (None, "pt", "np", EMBEDDINGS_FORMAT)):
            raise ValueError(f"{path}: not a pqjax prompt-embeddings file (expected tensors "
                             f"{' + '.join(EMBEDDING_NAMES[0])} or {' + '.join(EMBEDDING_NAMES[1])}; found "
                             f"{sorted(f.keys())[:6]}, metadata format {fmt!r})")
        prompts = json.loads(f.metadata["prompts"]) if "prompts" in f.metadata else None
        return cls(jnp.asarray(f.read(names[0], dtype)), jnp.asarray(f.read(names[1], dtype)), prompts)


def check_text_inputs(config, encoder_hidden_states, pooled_projections, *, origin: str = "") -> int:
    """The one check of text inputs against a FLUX transformer ``config``: ``encoder_hidden_states [B, N_txt,
    joint_attention_dim]`` and ``pooled_projections [B, pooled_projection_dim]`` with the same B (returned).
    ``origin`` (e.g. a file name) starts the ValueError's message."""
    where = f"{origin}: " if origin else ""
    enc, pool = tuple(np.shape(encoder_hidden_states)), tuple(np.shape(pooled_projections))
    if len(enc) != 3 or enc[-1] != config.joint_attention_dim:
        raise ValueError(f"{where}encoder_hidden_states must be [B, N_txt, {config.joint_attention_dim}] "
                         f"(joint_attention_dim) for this model, got shape {enc}")
    if len(pool) != 2 or pool[-1] != config.pooled_projection_dim:
        raise ValueError(f"{where}pooled_projections must be [B, {config.pooled_projection_dim}] "
                         f"(pooled_projection_dim) for this model, got shape {pool}")
    if enc[0] != pool[0]:
        raise ValueError(f"{where}batch sizes differ: encoder_hidden_states {enc[0]}, pooled_projections {pool[0]}")
    return enc[0]
