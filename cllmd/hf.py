"""Hugging Face GPT-2 checkpoints in and out: config.json, safetensors weights, tokenizer.json.

import_hf reads a GPT-2 family directory (weights memory-mapped, never copied on the way) into a
.cllm file; export_hf writes a .cllm model back in that layout, which transformers'
GPT2LMHeadModel and the `tokenizers` library load. docs/huggingface.md says what maps to what.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cllm.catalogue import SAMPLING, check_sampling
from cllmd.kernels.transformer import LN_EPS
from cllmd.model import ModelConfig, clock_features, param_table
from cllm.durable import atomic_path, atomic_write
from cllmd.modelfile import read_model_file, write_model_file
from cllmd.tokenizer import EOT, Tokenizer, TokenizerError, bpe_from_vocab_merges, tokenizer_from_json

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
VOCAB, MERGES = "vocab.json", "merges.txt"

# The GELU cllmd's kernels compute (tanh approximation), under both of its transformers names.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Buffers older GPT-2 files carry beside the weights: the causal mask and its fill value.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# safetensors dtype names -> how a tensor becomes float32 (bfloat16: the high half of a float32).
_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"),
                       "BF16": np.dtype("<u2")}
# GPT-2's config defaults (transformers' GPT2Config) for the fields cllmd does not model; export
# writes them unless the model was imported with other values (kept in its metadata).
_GPT2_DEFAULTS = {"attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "initializer_range": 0.02,
                  "summary_type": "cls_index", "summary_use_proj": True, "summary_activation": None,
                  "summary_proj_to_labels": True, "summary_first_dropout": 0.1, "use_cache": True}


class HFError(ValueError):
    """A Hugging Face directory that cannot be imported (or a model that cannot be exported);
    the message names the file and what is wrong."""

    def __init__(self, path: os.PathLike | str, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# ---- reading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(path, "no such file") from None
    except OSError as e:
        raise HFError(path, f"cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(path, f"not valid JSON: {e}") from None


def read_config(src: Path) -> tuple[ModelConfig, dict]:
    """cllmd's ModelConfig from a GPT-2 config.json, refusing what cllmd's kernels compute otherwise."""
    path = src / CONFIG
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise HFError(path, "not a JSON object")
    kind = hf.get("model_type")
    if kind != "gpt2":
        arch = ", ".join(hf.get("architectures") or []) or "none named"
        raise HFError(path, f"model_type {kind!r} (architectures: {arch}) is not GPT-2; cllmd imports "
                            "GPT-2 family checkpoints (gpt2, distilgpt2, gpt2-medium, ...)")

    def need(key: str, *aliases: str) -> int:
        for k in (key, *aliases):
            if k in hf:
                v = hf[k]
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise HFError(path, f"{k} must be a positive integer, got {v!r}")
                return v
        raise HFError(path, f"missing {key!r}")

    n_layer, n_head, n_embd = need("n_layer"), need("n_head"), need("n_embd")
    n_positions, vocab_size = need("n_positions", "n_ctx"), need("vocab_size")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELU:
        raise HFError(path, f"activation_function {act!r}: cllmd's kernels compute GELU's tanh "
                            f"approximation ({' or '.join(TANH_GELU)}) only")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LN_EPS, rel_tol=1e-6):
        raise HFError(path, f"layer_norm_epsilon {eps!r}: cllmd's kernels use a fixed {LN_EPS:g}")
    refusals = [
        (hf.get("n_inner") not in (None, 4 * n_embd), f"n_inner {hf.get('n_inner')!r}: cllmd's MLP is 4 x n_embd"),
        (hf.get("scale_attn_weights", True) is not True, "scale_attn_weights false: cllmd scales attention by 1/sqrt(head size)"),
        (bool(hf.get("scale_attn_by_inverse_layer_idx")), "scale_attn_by_inverse_layer_idx: cllmd does not scale by layer"),
        (bool(hf.get("add_cross_attention")), "add_cross_attention: cllmd's blocks have no cross-attention"),
    ]
    for bad, why in refusals:
        if bad:
            raise HFError(path, why)
    try:
        cfg = ModelConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          block_size=n_positions)
    except ValueError as e:
        raise HFError(path, str(e)) from None
    return cfg, hf


class _SafetensorsFile:
    """One .safetensors file: validated by the `safetensors` library, mapped once read-only.

    safetensors' own numpy get_tensor copies each tensor into a fresh buffer (and has no
    bfloat16), so the tensors are numpy views of one np.memmap at the offsets the header states,
    after safe_open has checked that header (offsets in order, inside the file, dtypes known).
    """

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open
        self.path = path
        if not path.is_file():
            raise HFError(path, "no such file")
        try:
            with safe_open(os.fspath(path), framework="numpy") as f:
                names = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise HFError(path, f"not a readable safetensors file (truncated or damaged): {e}") from None
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.entries = {name: header[name] for name in names}
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.data_start = 8 + n

    def tensor(self, name: str) -> tuple[str, list[int], np.ndarray]:
        """(safetensors dtype, shape, raw view); the view copies nothing."""
        e = self.entries[name]
        if e["dtype"] not in _SAFETENSORS_DTYPES:
            raise HFError(self.path, f"tensor {name!r} has dtype {e['dtype']}; cllmd reads "
                                     f"{', '.join(_SAFETENSORS_DTYPES)}")
        begin, end = e["data_offsets"]
        flat = self.mm[self.data_start + begin:self.data_start + end]
        return e["dtype"], list(e["shape"]), flat.view(_SAFETENSORS_DTYPES[e["dtype"]]).reshape(e["shape"])


def _as_float32(dtype: str, raw: np.ndarray) -> np.ndarray:
    if dtype == "F32":
        return raw  # the memory-mapped view itself
    if dtype == "BF16":  # bfloat16 is the upper half of a float32: exact
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _weight_files(src: Path) -> tuple[list[_SafetensorsFile], Path]:
    """The safetensors files of a checkpoint (one, or the shards its index names)."""
    index = src / WEIGHTS_INDEX
    if (src / WEIGHTS).is_file():
        return [_SafetensorsFile(src / WEIGHTS)], src / WEIGHTS
    if index.is_file():
        idx = _read_json(index)
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFError(index, "has no 'weight_map' of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        files = []
        for name in shards:
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                raise HFError(index, f"bad shard file name {name!r}")
            files.append(_SafetensorsFile(src / name))
        held = {n for f in files for n in f.entries}
        missing = sorted(set(weight_map) - held)
        if missing:
            raise HFError(index, f"tensors {missing[:3]} are in no shard")
        return files, index
    if (src / TORCH_WEIGHTS).is_file():
        raise HFError(src / TORCH_WEIGHTS,
                      "pickled PyTorch weights need torch to read, and can run code; convert them once "
                      "to model.safetensors with: python -c \"from transformers import GPT2LMHeadModel; "
                      f"GPT2LMHeadModel.from_pretrained('{src}').save_pretrained('{src}')\"")
    raise HFError(src / WEIGHTS, "no such file (nor model.safetensors.index.json)")


def read_weights(src: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The float32 tensors of cfg's parameter table, in its order, from src's safetensors files.

    Names may carry transformers' "transformer." prefix or not (the hub's original gpt2 files);
    the causal-mask buffers are skipped; lm_head.weight must be tied (equal to wte).
    """
    files, where = _weight_files(src)
    found: dict[str, tuple[_SafetensorsFile, str]] = {}
    unknown = []
    expected = dict(param_table(cfg))
    for f in files:
        for raw_name in f.entries:
            name = raw_name.removeprefix("transformer.")
            name = name.removesuffix(".weight") if name in ("wte.weight", "wpe.weight") else name
            if name.endswith(MASK_BUFFERS):
                continue
            if name in expected or name == "lm_head.weight":
                found[name] = (f, raw_name)
            else:
                unknown.append(raw_name)
    if unknown:
        raise HFError(where, f"tensors a GPT-2 LM head model does not have: {unknown[:5]}")
    missing = [n for n in expected if n not in found]
    if missing:
        raise HFError(where, f"missing tensors {missing[:5]}")
    tensors = {}
    for name, shape in expected.items():
        f, raw_name = found[name]
        dtype, got, raw = f.tensor(raw_name)
        if tuple(got) != shape:
            raise HFError(f.path, f"tensor {raw_name!r} has shape {got}, but config.json makes it {list(shape)}")
        tensors[name] = _as_float32(dtype, raw)
    if "lm_head.weight" in found:
        f, raw_name = found["lm_head.weight"]
        dtype, got, raw = f.tensor(raw_name)
        if tuple(got) != expected["wte"] or not np.array_equal(_as_float32(dtype, raw), tensors["wte"]):
            raise HFError(f.path, "lm_head.weight differs from the token embedding: cllmd's head is tied "
                                  "to wte (tie_word_embeddings), an untied head cannot be imported")
    return tensors


def read_tokenizer(src: Path, vocab_size: int) -> Tokenizer:
    """tokenizer.json, or else GPT-2's vocab.json + merges.txt; never larger than vocab_size."""
    if (src / TOKENIZER).is_file():
        path = src / TOKENIZER
        try:
            tok = tokenizer_from_json(path.read_text(encoding="utf-8"))
        except (TokenizerError, OSError, UnicodeDecodeError) as e:
            raise HFError(path, str(e)) from None
    elif (src / VOCAB).is_file() or (src / MERGES).is_file():
        path = src / VOCAB
        try:
            tok = bpe_from_vocab_merges(src / VOCAB, src / MERGES)
        except TokenizerError as e:
            raise HFError(path, str(e)) from None
    else:
        raise HFError(src / TOKENIZER, "no such file (nor vocab.json + merges.txt)")
    if tok.vocab_size > vocab_size:
        raise HFError(path, f"the tokenizer has {tok.vocab_size} tokens, more than the model's "
                            f"vocabulary of {vocab_size} (config.json vocab_size)")
    return tok


def generation_defaults(gen: dict, block_size: int) -> dict:
    """cllmd's sampling defaults (cllm.catalogue.SAMPLING names) from a generation_config.json.

    Only keys the file sets count. do_sample false is greedy (temperature 0); HF's
    repetition_penalty covers the whole context, so repeat_last_n becomes the context length.
    """
    out: dict[str, Any] = {}
    sampling = gen.get("do_sample")
    if sampling is False:
        out["temperature"] = 0.0
    elif "temperature" in gen:
        out["temperature"] = gen["temperature"]
    for hf_key, key in (("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                        ("max_new_tokens", "max_tokens")):
        if gen.get(hf_key) is not None:
            out[key] = gen[hf_key]
    if gen.get("repetition_penalty") is not None:
        out["repeat_penalty"] = gen["repetition_penalty"]
        out["repeat_last_n"] = block_size
    for key in ("temperature", "top_p", "min_p", "repeat_penalty"):
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = float(out[key])
    return out


def _read_generation_defaults(src: Path, cfg: ModelConfig, eot_id: int) -> dict:
    path = src / GENERATION_CONFIG
    if not path.is_file():
        return {}
    gen = _read_json(path)
    if not isinstance(gen, dict):
        raise HFError(path, "not a JSON object")
    defaults = generation_defaults(gen, cfg.block_size)
    problems = check_sampling(defaults)
    if problems:
        raise HFError(path, "; ".join(problems))
    eos = gen.get("eos_token_id")
    if eos is not None and eos != eot_id and eos != [eot_id]:
        log.warning("%s: eos_token_id %r is not the tokenizer's %s (%d); generation stops at %d",
                    path, eos, EOT, eot_id, eot_id)
    return defaults


def import_hf(src: os.PathLike | str, out: os.PathLike | str) -> dict:
    """Write the GPT-2 checkpoint directory src as the .cllm file out; returns a summary.

    The float32 tensors go from the memory-mapped safetensors files straight to the .cllm file.
    """
    src = Path(src)
    if not src.is_dir():
        raise HFError(src, "no such directory" if not src.exists() else "not a directory")
    cfg, hf_config = read_config(src)
    tok = read_tokenizer(src, cfg.vocab_size)
    defaults = _read_generation_defaults(src, cfg, tok.eot_id)
    tensors = read_weights(src, cfg)
    metadata = {"imported_from": os.path.abspath(src), "hf_config": hf_config,
                "generation_defaults": defaults}
    try:
        write_model_file(out, tensors, config=cfg.to_dict(), tokenizer=tok.to_json(), metadata=metadata)
    except OSError as e:
        raise HFError(out, f"cannot write: {e.strerror or e}") from None
    return {"out": os.fspath(out), "parameters": sum(int(t.size) for t in tensors.values()),
            "config": cfg.to_dict(), "tokenizer": tok.kind, "tokenizer_vocab_size": tok.vocab_size,
            "generation_defaults": defaults}


# ---- writing -------------------------------------------------------------------------------------


def hf_generation_config(defaults: dict, eot_id: int | None) -> dict:
    """generation_config.json for cllmd's sampling defaults (the inverse of generation_defaults)."""
    gen: dict[str, Any] = {}
    if eot_id is not None:
        gen["bos_token_id"] = gen["eos_token_id"] = eot_id
    temperature = defaults.get("temperature", SAMPLING["temperature"].default)
    if temperature == 0:
        gen["do_sample"] = False
    else:
        gen["do_sample"] = True
        gen["temperature"] = temperature
        gen["top_k"] = defaults.get("top_k", SAMPLING["top_k"].default)
        gen["top_p"] = defaults.get("top_p", SAMPLING["top_p"].default)
        if defaults.get("min_p", SAMPLING["min_p"].default):
            gen["min_p"] = defaults.get("min_p", SAMPLING["min_p"].default)
    if defaults.get("repeat_penalty", 1.0) != 1.0:
        gen["repetition_penalty"] = defaults["repeat_penalty"]
    gen["max_new_tokens"] = defaults.get("max_tokens", SAMPLING["max_tokens"].default)
    return gen


# An exported directory is for other tools, often run by other users: world-readable files.
EXPORT_MODE = 0o644


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n", mode=EXPORT_MODE)


def _save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    with atomic_path(path, mode=EXPORT_MODE) as tmp:
        save_file(tensors, os.fspath(tmp), metadata={"format": "pt"})


def export_hf(model_path: os.PathLike | str, out_dir: os.PathLike | str) -> dict:
    """Write the .cllm model at model_path as a transformers GPT-2 directory; returns a summary.

    Clock positions (fixed features added to the learned positions) are folded into wpe:
    wpe_hf = wpe + clock_features(block_size, n_embd), the very table the model adds.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    try:
        header, tensors = read_model_file(model_path)
    except FileNotFoundError:
        raise HFError(model_path, "no such file") from None
    try:
        cfg = ModelConfig.from_dict(header["config"])
    except (TypeError, ValueError) as e:
        raise HFError(model_path, f"bad model config: {e}") from None
    table = param_table(cfg)
    for name, shape in table:
        if name not in tensors or tuple(tensors[name].shape) != shape:
            raise HFError(model_path, f"tensor {name} is missing or not of shape {list(shape)}")
    tok = tokenizer_from_json(header["tokenizer"]) if header.get("tokenizer") else None
    meta = header.get("metadata") or {}

    weights = {}
    for name, _ in table:
        t = np.asarray(tensors[name], dtype=np.float32)
        if name == "wpe" and cfg.clock_positions:
            t = t + clock_features(cfg.block_size, cfg.n_embd).astype(np.float32)
        key = "transformer." + (name + ".weight" if name in ("wte", "wpe") else name)
        weights[key] = t
    eot = tok.eot_id if tok is not None else None
    hf_config = {**_GPT2_DEFAULTS, **{k: v for k, v in (meta.get("hf_config") or {}).items()
                                      if k in _GPT2_DEFAULTS}}
    hf_config.update({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": None,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": LN_EPS, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, "dtype": "float32", "torch_dtype": "float32",
    })
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_safetensors(out_dir / WEIGHTS, weights)
        _atomic_json(out_dir / CONFIG, hf_config)
        _atomic_json(out_dir / GENERATION_CONFIG, hf_generation_config(meta.get("generation_defaults") or {}, eot))
        if tok is not None:
            atomic_write(out_dir / TOKENIZER, tok.to_hf_json(), mode=EXPORT_MODE)
            specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
            _atomic_json(out_dir / "special_tokens_map.json", specials)
            _atomic_json(out_dir / "tokenizer_config.json", {
                **specials, "tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
                "model_max_length": cfg.block_size, "clean_up_tokenization_spaces": False})
    except OSError as e:
        raise HFError(out_dir, f"cannot write: {e.strerror or e}") from None
    if tok is None:
        log.warning("%s carries no tokenizer: %s has the weights only", model_path, out_dir)
    return {"out": os.fspath(out_dir), "parameters": sum(int(t.size) for t in weights.values()),
            "tokenizer": tok.kind if tok is not None else None,
            "clock_positions_folded": cfg.clock_positions}


__all__ = ["HFError", "export_hf", "generation_defaults", "hf_generation_config", "import_hf",
           "read_config", "read_tokenizer", "read_weights"]
