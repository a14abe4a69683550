"""A whole diffusers FLUX pipeline folder -> pqjax components: tokenizers, CLIP, T5, transformer, VAE, scheduler.

    pipe = converters.load_flux_pipeline("path/to/FLUX.1-dev", dtype=jnp.bfloat16)
    pipe.text_encoder.config          # read now (and every weight file's header checked against it)
    pipe.text_encoder.params          # read on first use, one tensor at a time (memory-mapped), then cached
    pipe.text_encoder.release()       # drop the cached params (the pipeline does this before denoising)

Weights are read like the transformer's (:func:`converters.load_flux`): headers are validated first (missing,
unexpected, mis-shaped tensors and unsupported dtypes raise :class:`ConversionError` naming the file and key), then
tensors are read one at a time and converted to the requested dtype. Parameter names are the checkpoints' own module
names (Flax layouts: Linear ``kernel [in, out]``, Conv ``kernel [kh, kw, in, out]``, norms ``scale``, embeddings
``embedding``); see :mod:`pqjax.models.clip`, :mod:`pqjax.models.t5`, :mod:`pqjax.models.vae`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Generic, Iterable, Mapping, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.io.safetensors import FLOAT_DTYPES, SafetensorsFile
from pqjax.models import clip, t5, vae
from pqjax.models.common import is_shape
from pqjax.models.flux import FluxConfig
from pqjax.pipeline.prompts import Tokenizer
from pqjax.pipeline.scheduler import FlowMatchConfig

from . import diffusers_format
from .errors import ConversionError, key_list
from .loader import load_flux

__all__ = ["load_flux_pipeline", "FluxPipelineComponents", "LazyComponent", "COMPONENTS",
           "load_clip_text_encoder", "load_t5_encoder", "load_vae"]

#: The pipeline folder's subfolders that pqjax uses.
COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "vae", "scheduler")

C = TypeVar("C")


# ----------------------------------------------------------------------------------------------
# Plans: checkpoint tensors -> params leaves, validated against the headers before anything is read
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]        # in the params tree
    source: str                  # checkpoint key
    torch_shape: tuple[int, ...]
    perm: tuple[int, ...] | None  # transpose torch -> Flax (None: as is)


def _torch_leaf(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], tuple[int, ...] | None]:
    """Flax leaf -> (torch state-dict key, torch shape, transpose order)."""
    module, leaf = ".".join(path[:-1]), path[-1]
    if leaf == "kernel" and len(shape) == 2:          # Linear [out, in] -> [in, out]
        return module + ".weight", shape[::-1], (1, 0)
    if leaf == "kernel" and len(shape) == 4:          # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
        kh, kw, c_in, c_out = shape
        return module + ".weight", (c_out, c_in, kh, kw), (2, 3, 1, 0)
    if leaf in ("scale", "embedding"):
        return module + ".weight", shape, None
    return f"{module}.{leaf}", shape, None


class _Plan:
    """Which checkpoint tensor fills which params leaf; :meth:`read` materializes them one at a time."""

    def __init__(self, what: str, origin: str, layout: dict, files: Mapping[str, tuple[SafetensorsFile, str]],
                 aliases: Callable[[str], Sequence[str]] = lambda k: (k,), ignore: Callable[[str], bool] = lambda k: False):
        self.what, self.origin, self.files = what, origin, files
        self.leaves: list[_Leaf] = []
        missing = []
        for kpath, shape in jax.tree_util.tree_flatten_with_path(layout, is_leaf=is_shape)[0]:
            path = tuple(k.key for k in kpath)
            key, torch_shape, perm = _torch_leaf(path, shape)
            source = next((a for a in aliases(key) if a in files), None)
            if source is None:
                missing.append(" or ".join(repr(a) for a in aliases(key)) if len(aliases(key)) > 1 else key)
                continue
            self.leaves.append(_Leaf(path, source, torch_shape, perm))
        used = {leaf.source for leaf in self.leaves}
        unexpected = [k for k in files if k not in used and not ignore(k)]
        if missing or unexpected:
            msg = [f"{origin}: weights do not match {what}"]
            if missing:
                msg.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}"
                           + (f", ... (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
            if unexpected:
                msg.append(f"unexpected keys ({len(unexpected)}): {key_list(unexpected)}")
            raise ConversionError("; ".join(msg))
        wrong = []
        for leaf in self.leaves:
            f, k = files[leaf.source]
            f.check_dtype(k, FLOAT_DTYPES)
            if f.info(k).shape != leaf.torch_shape:
                wrong.append(f"{f.path}: tensor {k!r} has shape {f.info(k).shape}, expected {leaf.torch_shape}")
        if wrong:
            more = f" (+{len(wrong) - 10} more)" if len(wrong) > 10 else ""
            raise ConversionError(f"shape mismatch for {what} (torch layout): " + "; ".join(wrong[:10]) + more)

    def read(self, dtype) -> dict:
        params: dict = {}
        target = np.dtype(dtype)
        for leaf in self.leaves:
            f, k = self.files[leaf.source]
            arr = f.read(k, target)
            host = np.ascontiguousarray(arr.transpose(leaf.perm)) if leaf.perm else arr
            value = jax.device_put(host)
            value.block_until_ready()  # finish the transfer before reading the next tensor
            node = params
            for p in leaf.path[:-1]:
                node = node.setdefault(p, {})
            node[leaf.path[-1]] = value
            del arr, host, value
        return params


# ----------------------------------------------------------------------------------------------
# Files and configs
# ----------------------------------------------------------------------------------------------

_TRANSFORMERS_WEIGHTS = "model.safetensors"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e}") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return d


def _folder_config(folder: str, what: str) -> dict:
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: no such folder (expected the {what})")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{folder}: no config.json (expected the {what})")
    return _read_json(path)


def _transformers_weights(folder: str) -> dict[str, tuple[SafetensorsFile, str]]:
    index = os.path.join(folder, _TRANSFORMERS_WEIGHTS + ".index.json")
    single = os.path.join(folder, _TRANSFORMERS_WEIGHTS)
    if os.path.isfile(index):
        return diffusers_format.open_index(folder, index)
    if os.path.isfile(single):
        f = diffusers_format.open_safetensors(single)
        return {k: (f, k) for k in f.keys()}
    bins = [n for n in sorted(os.listdir(folder)) if n.endswith(".bin")]
    hint = f" (found {bins}: only .safetensors weights are supported)" if bins else ""
    raise ConversionError(f"{folder}: no weights: expected {_TRANSFORMERS_WEIGHTS} or "
                          f"{_TRANSFORMERS_WEIGHTS}.index.json{hint}")


def _check_kind(d: dict, path: str, model_types: Iterable[str], class_names: Iterable[str]) -> None:
    mt, cls = d.get("model_type"), d.get("_class_name")
    archs = d.get("architectures") or []
    if (mt is not None and mt not in model_types) or (cls is not None and cls not in class_names) \
            or (archs and not set(archs) & set(class_names)):
        raise ConversionError(f"{path}: describes {cls or mt or archs}, expected one of {sorted(class_names)}")


# ----------------------------------------------------------------------------------------------
# Per-component plans and loaders
# ----------------------------------------------------------------------------------------------

def _clip_plan(folder: str) -> tuple[clip.CLIPTextConfig, _Plan]:
    d = _folder_config(folder, "CLIP text encoder (CLIPTextModel)")
    _check_kind(d, os.path.join(folder, "config.json"), ("clip_text_model", "clip"),
                ("CLIPTextModel", "CLIPModel", "CLIPTextModelWithProjection"))
    try:
        config = clip.CLIPTextConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{folder}/config.json: invalid CLIP text config: {e}") from e
    files = _transformers_weights(folder)
    # transformers < 5 saves CLIPTextModel under "text_model." (FLUX.1's own files); 5.x saves without it
    plan = _Plan(f"a CLIPTextModel with {config}", folder, clip.param_layout(config), files,
                 aliases=lambda k: (k, "text_model." + k),
                 ignore=lambda k: k.endswith("position_ids") or k.startswith(("text_projection.", "vision_model.",
                                                                               "visual_projection.", "logit_scale")))
    return config, plan


def _t5_plan(folder: str) -> tuple[t5.T5EncoderConfig, _Plan]:
    d = _folder_config(folder, "T5 encoder (T5EncoderModel)")
    _check_kind(d, os.path.join(folder, "config.json"), ("t5",), ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model"))
    try:
        config = t5.T5EncoderConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{folder}/config.json: invalid T5 config: {e}") from e
    files = _transformers_weights(folder)
    tied = ("shared.weight", "encoder.embed_tokens.weight")  # the same tensor: either may be stored
    plan = _Plan(f"a T5EncoderModel with {config}", folder, t5.param_layout(config), files,
                 aliases=lambda k: tied if k == "shared.weight" else (k,),
                 ignore=lambda k: k in tied or k.startswith("decoder.") or k == "lm_head.weight")
    return config, plan


def _vae_plan(folder: str) -> tuple[vae.VAEConfig, _Plan]:
    d = _folder_config(folder, "VAE (AutoencoderKL)")
    _check_kind(d, os.path.join(folder, "config.json"), (), ("AutoencoderKL",))
    try:
        config = vae.VAEConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{folder}/config.json: invalid AutoencoderKL config: {e}") from e
    files = diffusers_format.open_weights(folder)
    return config, _Plan(f"an AutoencoderKL with {config}", folder, vae.param_layout(config), files)


def load_clip_text_encoder(folder, dtype=jnp.bfloat16) -> tuple[clip.CLIPTextConfig, dict]:
    """A transformers ``CLIPTextModel`` folder (config.json + model.safetensors[.index.json]) -> (config, params)."""
    config, plan = _clip_plan(os.fspath(folder))
    return config, plan.read(dtype)


def load_t5_encoder(folder, dtype=jnp.bfloat16) -> tuple[t5.T5EncoderConfig, dict]:
    """A transformers ``T5EncoderModel`` folder -> (config, params)."""
    config, plan = _t5_plan(os.fspath(folder))
    return config, plan.read(dtype)


def load_vae(folder, dtype=jnp.float32) -> tuple[vae.VAEConfig, dict]:
    """A diffusers ``AutoencoderKL`` folder (config.json + diffusion_pytorch_model.safetensors) -> (config, params)."""
    config, plan = _vae_plan(os.fspath(folder))
    return config, plan.read(dtype)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------

class LazyComponent(Generic[C]):
    """One model of the pipeline: ``config`` now, ``params`` on first use (cached until :meth:`release`)."""

    def __init__(self, name: str, folder: str, config: C, loader: Callable[[], Any]):
        self.name, self.folder, self.config = name, folder, config
        self._loader = loader
        self._params = None

    @property
    def loaded(self) -> bool:
        return self._params is not None

    @property
    def params(self):
        if self._params is None:
            self._params = self._loader()
        return self._params

    def release(self) -> None:
        """Drop the cached params (their device buffers are freed once nothing else references them)."""
        self._params = None

    def __repr__(self):
        return f"LazyComponent({self.name!r}, {type(self.config).__name__}, loaded={self.loaded})"


@dataclasses.dataclass
class FluxPipelineComponents:
    """What :func:`load_flux_pipeline` returns; components not requested are ``None``."""

    path: str
    dtype: Any
    tokenizer: Any = None                                   # pqjax.pipeline.Tokenizer (CLIP)
    tokenizer_2: Any = None                                 # pqjax.pipeline.Tokenizer (T5)
    text_encoder: LazyComponent[clip.CLIPTextConfig] | None = None
    text_encoder_2: LazyComponent[t5.T5EncoderConfig] | None = None
    transformer: LazyComponent[FluxConfig] | None = None
    vae: LazyComponent[vae.VAEConfig] | None = None
    scheduler_config: FlowMatchConfig | None = None

    def release(self, *names: str) -> None:
        """Release the named components' params (all if none named)."""
        for name in names or ("text_encoder", "text_encoder_2", "transformer", "vae"):
            comp = getattr(self, name)
            if comp is not None:
                comp.release()


def load_flux_pipeline(path, dtype=jnp.bfloat16, *, vae_dtype=None,
                       components: Sequence[str] | None = None) -> FluxPipelineComponents:
    """Open a diffusers FLUX pipeline folder (``model_index.json`` + component subfolders).

    Configs, tokenizers and every weight file's header are read and cross-checked now (a missing subfolder, a
    tokenizer whose vocabulary does not fit its encoder, a wrong tensor shape: :class:`ConversionError`); params are
    read on first use of ``component.params``. ``dtype`` is the params' dtype for the text encoders and the
    transformer; the VAE uses ``vae_dtype``, by default float32 when its config asks for ``force_upcast`` (FLUX's
    does) and ``dtype`` otherwise. ``components``: the subset of :data:`COMPONENTS` to open (default all), e.g.
    everything but ``"transformer"`` when the transformer comes from a pqjax checkpoint.
    """
    path = os.fspath(path)
    wanted = tuple(COMPONENTS if components is None else components)
    bad = sorted(set(wanted) - set(COMPONENTS))
    if bad:
        raise ConversionError(f"unknown pipeline components {bad}; known: {list(COMPONENTS)}")
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such folder (expected a diffusers FLUX pipeline folder)")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise ConversionError(f"{path}: not a diffusers pipeline folder: no model_index.json")
    index = _read_json(index_path)
    missing = [n for n in wanted if not os.path.isdir(os.path.join(path, n))]
    if missing:
        raise ConversionError(f"{path}: pipeline folder lacks the component folder(s) {missing} "
                              f"(a FLUX pipeline needs {list(COMPONENTS)})")
    sub = lambda n: os.path.join(path, n)
    out = FluxPipelineComponents(path=path, dtype=dtype)

    if "text_encoder" in wanted:
        config, plan = _clip_plan(sub("text_encoder"))
        out.text_encoder = LazyComponent("text_encoder", sub("text_encoder"), config, lambda p=plan: p.read(dtype))
    if "text_encoder_2" in wanted:
        config, plan = _t5_plan(sub("text_encoder_2"))
        out.text_encoder_2 = LazyComponent("text_encoder_2", sub("text_encoder_2"), config, lambda p=plan: p.read(dtype))
    for name, enc in (("tokenizer", out.text_encoder), ("tokenizer_2", out.text_encoder_2)):
        if name in wanted:
            cls = (index.get(name) or [None, None])[1]
            tok = Tokenizer.from_folder(sub(name), class_name=cls)
            if enc is not None:
                _check_tokenizer(tok, enc)
            setattr(out, name, tok)
    if "transformer" in wanted:
        folder = sub("transformer")
        config = diffusers_format.read_config(folder, None)
        out.transformer = LazyComponent("transformer", folder, config, lambda: load_flux(folder, dtype)[1])
    if "vae" in wanted:
        config, plan = _vae_plan(sub("vae"))
        vdt = vae_dtype if vae_dtype is not None else (jnp.float32 if config.force_upcast else dtype)
        out.vae = LazyComponent("vae", sub("vae"), config, lambda p=plan: p.read(vdt))
    if "scheduler" in wanted:
        sched_path = os.path.join(sub("scheduler"), "scheduler_config.json")
        if not os.path.isfile(sched_path):
            raise ConversionError(f"{sub('scheduler')}: no scheduler_config.json")
        try:
            out.scheduler_config = FlowMatchConfig.from_diffusers_config(_read_json(sched_path))
        except ValueError as e:
            raise ConversionError(f"{sched_path}: {e}") from e
    _check_dims(out)
    return out


def _check_tokenizer(tok, enc: LazyComponent) -> None:
    """The tokenizer must only produce ids the encoder's embedding table has."""
    vocab = enc.config.vocab_size
    if tok.vocab_size > vocab:
        raise ConversionError(
            f"{tok.folder}: tokenizer has {tok.vocab_size} base tokens but {enc.folder} embeds only {vocab} "
            f"(vocab_size): the tokenizer does not belong to this encoder")
    if isinstance(enc.config, clip.CLIPTextConfig) and tok.model_max_length > enc.config.max_position_embeddings:
        raise ConversionError(
            f"{tok.folder}: model_max_length={tok.model_max_length} exceeds the CLIP encoder's "
            f"max_position_embeddings={enc.config.max_position_embeddings} ({enc.folder})")


def _check_dims(p: FluxPipelineComponents) -> None:
    """The encoders' widths and the VAE's latent channels must fit the transformer."""
    if p.transformer is None:
        return
    c = p.transformer.config
    checks = []
    if p.text_encoder is not None:
        checks.append((p.text_encoder.config.hidden_size, c.pooled_projection_dim,
                       "text_encoder hidden_size", "transformer pooled_projection_dim"))
    if p.text_encoder_2 is not None:
        checks.append((p.text_encoder_2.config.d_model, c.joint_attention_dim,
                       "text_encoder_2 d_model", "transformer joint_attention_dim"))
    if p.vae is not None:
        checks.append((4 * p.vae.config.latent_channels, c.in_channels,
                       "4 x vae latent_channels", "transformer in_channels"))
    for a, b, na, nb in checks:
        if a != b:
            raise ConversionError(f"{p.path}: {na}={a} does not match {nb}={b}")
