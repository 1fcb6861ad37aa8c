"""Hugging Face import and export against transformers, safetensors and tokenizers themselves.

Every fixture is written by those libraries (save_pretrained, safetensors' save_file), every
comparison is against transformers' own GPT2LMHeadModel and tokenizers' own Tokenizer.
"""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the cross-checks need PyTorch (a test-only install, see .ci/run)")
transformers = pytest.importorskip("transformers", reason="the cross-checks need transformers (test-only)")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, PreTrainedTokenizerFast  # noqa: E402

from cllmd.cli import main  # noqa: E402
from cllmd.generate import Generation, SamplingOptions  # noqa: E402
from cllmd.model import Model, ModelConfig  # noqa: E402
from cllmd.tokenizer import EOT, BytesTokenizer, load_tokenizer  # noqa: E402

N_LAYER, N_HEAD, N_EMBD, N_POS = 2, 2, 32, 48

TEXTS = [
    "", "hello world", "Hello, World! 123 4.56", "don't stop it's", "  leading and trailing  ",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷", "日本語のテキスト、中文字符，한국어", "Ελληνικά кириллица العربية",
    "control \x00\x01\x07\x1b[0m\x7f chars\r\n\ttab", "line\nbreaks\n\n\nand\r\nCRLF\n",
    EOT, f"one{EOT}two", f"{EOT}{EOT}", f"before\n{EOT}\nafter", f"<|endoftext|{EOT}>", "<|endoftext",
    "a" * 5000, " " * 3000, "\n" * 2000, "ab " * 3000, "😀" * 1000, ("word " * 20 + "\n") * 2000,
]


def _train_tokenizer(size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog. " * 40, "日本語 😀 emoji text\n\n" * 20,
              "def f(x):\n    return x + 1\n" * 30]
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_tok():
    tok = _train_tokenizer()
    return GPT2TokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT)


def _randomize(model):
    # transformers' init leaves biases 0 and LayerNorms 1: perturb everything so each tensor counts.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _make(directory, hf_tok, *, vocab_size=None, dtype=None, shard=False, seed=0, **config):
    cfg = GPT2Config(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, n_positions=N_POS,
                     vocab_size=vocab_size or len(hf_tok), bos_token_id=hf_tok.eos_token_id,
                     eos_token_id=hf_tok.eos_token_id, **config)
    torch.manual_seed(seed)
    model = _randomize(GPT2LMHeadModel(cfg)).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, safe_serialization=True, **({"max_shard_size": "20KB"} if shard else {}))
    hf_tok.save_pretrained(directory)
    return directory


def _hf_logits(directory, ids):
    model = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _import(src, out):
    assert main(["import", str(src), str(out)]) == 0
    return Model.load(out)


def _ids(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, N_POS))


def _rewrite(directory, change):
    """Rewrite model.safetensors with safetensors itself, its tensors passed through change()."""
    path = directory / "model.safetensors"
    tensors = change(load_file(path))
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})


def _no_prefix(t):
    return {k.removeprefix("transformer."): v for k, v in t.items()}


def _mask_buffers(t):
    out = dict(t)
    for i in range(N_LAYER):
        out[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, N_POS, N_POS, dtype=torch.uint8))
        out[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def _lm_head(t):
    return {**t, "lm_head.weight": t["transformer.wte.weight"].clone()}


VARIANTS = {
    "save_pretrained": ({}, None),
    "no_transformer_prefix": ({}, _no_prefix),
    "mask_buffers_original_names": ({}, lambda t: _no_prefix(_mask_buffers(t))),
    "lm_head_present": ({}, _lm_head),
    "float16": ({"dtype": torch.float16}, None),
    "bfloat16": ({"dtype": torch.bfloat16}, None),
    "sharded": ({"shard": True}, None),
    "padded_vocabulary": ({"vocab_size": 448}, None),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_import_variant_logits_equal_transformers(variant, hf_tok, tmp_path):
    kwargs, change = VARIANTS[variant]
    src = _make(tmp_path / "hf", hf_tok, **kwargs)
    if change:
        _rewrite(src, change)
    if variant == "sharded":
        assert (src / "model.safetensors.index.json").exists() and not (src / "model.safetensors").exists()
    model = _import(src, tmp_path / "m.cllm")
    assert model.cfg.vocab_size == kwargs.get("vocab_size", len(hf_tok))
    assert model.tokenizer.vocab_size == len(hf_tok)
    ids = _ids(model.cfg.vocab_size)
    np.testing.assert_allclose(model.forward(ids), _hf_logits(src, ids), atol=1e-4, rtol=0)
    if variant == "padded_vocabulary":
        # the padded rows never come out of generation, even when they would dominate
        model.params["wte"][len(hf_tok):] *= 100
        gen = Generation(model, "the quick", SamplingOptions(max_tokens=20, temperature=2.0, seed=1,
                                                             stop_at_eot=False))
        gen.text()
        assert gen.stats.tokens_generated == 20 and max(gen.stats.token_ids) < len(hf_tok)


def test_hf_import_reads_vocab_json_and_merges_txt(hf_tok, tmp_path):
    src = _make(tmp_path / "hf", hf_tok)
    (src / "tokenizer.json").unlink()
    # GPT-2's original files, written from the same BPE by tokenizers itself
    Tokenizer.from_str(hf_tok.backend_tokenizer.to_str()).model.save(str(src))
    assert (src / "vocab.json").exists() and (src / "merges.txt").exists()
    model = _import(src, tmp_path / "m.cllm")
    reference = hf_tok.backend_tokenizer
    for text in TEXTS:
        assert model.tokenizer.encode(text).tolist() == reference.encode(text).ids, text


def test_hf_import_keeps_generation_config_defaults_and_export_writes_them(hf_tok, tmp_path):
    src = _make(tmp_path / "hf", hf_tok)
    transformers.GenerationConfig(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1,
                                  max_new_tokens=50, eos_token_id=hf_tok.eos_token_id).save_pretrained(src)
    model = _import(src, tmp_path / "m.cllm")
    assert model.metadata["generation_defaults"] == {"temperature": 0.7, "top_k": 40, "top_p": 0.9,
                                                     "repeat_penalty": 1.1, "repeat_last_n": N_POS,
                                                     "max_tokens": 50}
    assert main(["export", str(tmp_path / "m.cllm"), str(tmp_path / "out")]) == 0
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty, gen.max_new_tokens,
            gen.eos_token_id) == (True, 0.7, 40, 0.9, 1.1, 50, hf_tok.eos_token_id)


def test_hf_import_greedy_generation_config(hf_tok, tmp_path):
    src = _make(tmp_path / "hf", hf_tok)
    transformers.GenerationConfig(do_sample=False, max_new_tokens=7).save_pretrained(src)
    model = _import(src, tmp_path / "m.cllm")
    assert model.metadata["generation_defaults"] == {"temperature": 0.0, "max_tokens": 7}


def test_hf_export_round_trip_logits_and_tokenizer(hf_tok, tmp_path):
    src = _make(tmp_path / "hf", hf_tok)
    model = _import(src, tmp_path / "m.cllm")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "m.cllm"), str(out)]) == 0
    ids = _ids(model.cfg.vocab_size, seed=3)
    exported = _hf_logits(out, ids)
    np.testing.assert_allclose(exported, model.forward(ids), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(exported, _hf_logits(src, ids))  # the same float32 weights
    # and the export imports back to the same model
    again = _import(out, tmp_path / "again.cllm")
    np.testing.assert_array_equal(again.flat, model.flat)
    _check_tokenizer_agreement(model.tokenizer, out)


def _check_tokenizer_agreement(tok, out):
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.eos_token == EOT and auto.eos_token_id == tok.eot_id
    for text in TEXTS:
        ids = tok.encode(text).tolist()
        assert hf.encode(text).ids == ids, text[:40]
        assert fast(text)["input_ids"] == ids, text[:40]
        assert auto(text)["input_ids"] == ids, text[:40]
        assert tok.decode(ids) == text
    assert tok.encode(EOT).tolist() == [tok.eot_id] == hf.encode(EOT).ids


@pytest.mark.parametrize("clock", [False, True])
def test_hf_export_bytes_tokenizer_model_loads_in_transformers(clock, tmp_path):
    cfg = ModelConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=32, clock_positions=clock)
    model = Model(cfg, seed=4, tokenizer=BytesTokenizer())
    model.flat[:] += np.random.default_rng(5).normal(0, 0.02, model.flat.size).astype(np.float32)
    model.save(tmp_path / "m.cllm")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "m.cllm"), str(out)]) == 0
    ids = np.random.default_rng(6).integers(0, 257, size=(2, 32))
    np.testing.assert_allclose(_hf_logits(out, ids), model.forward(ids), atol=1e-4, rtol=0)
    _check_tokenizer_agreement(model.tokenizer, out)
    # what HF loads is a byte-level BPE without merges; cllmd reads it back as the bytes tokenizer
    assert isinstance(load_tokenizer(out / "tokenizer.json"), BytesTokenizer)


# ---- bad sources: one line each, naming the file and what is wrong ----------------------------------


def _refused(capsys, src, out, *needles):
    capsys.readouterr()  # what the fixture's libraries printed
    assert main(["import", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    return err


def test_hf_import_refuses_missing_files(hf_tok, tmp_path, capsys):
    src = _make(tmp_path / "hf", hf_tok)
    out = tmp_path / "m.cllm"
    _refused(capsys, tmp_path / "nowhere", out, "nowhere", "no such directory")
    (src / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    _refused(capsys, src, out, "tokenizer.json: no such file (nor vocab.json + merges.txt)")
    (tmp_path / "tokenizer.json").rename(src / "tokenizer.json")
    (src / "model.safetensors").unlink()
    _refused(capsys, src, out, "model.safetensors: no such file")
    (src / "config.json").unlink()
    _refused(capsys, src, out, "config.json: no such file")


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hf_import_refuses_other_architectures(arch, tmp_path, capsys):
    if arch == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg.save_pretrained(tmp_path / "hf")
    _refused(capsys, tmp_path / "hf", tmp_path / "m.cllm", "config.json", f"model_type '{arch}'", "is not GPT-2")


def test_hf_import_refuses_shapes_that_disagree_with_the_config(hf_tok, tmp_path, capsys):
    src = _make(tmp_path / "hf", hf_tok)
    cfg = json.loads((src / "config.json").read_text())
    cfg["n_positions"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, src, tmp_path / "m.cllm", "model.safetensors", "'transformer.wpe.weight' has shape [48, 32]",
             "config.json makes it [64, 32]")


def test_hf_import_refuses_a_truncated_safetensors_file(hf_tok, tmp_path, capsys):
    src = _make(tmp_path / "hf", hf_tok)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    _refused(capsys, src, tmp_path / "m.cllm", "model.safetensors", "not a readable safetensors file")
    path.write_bytes(data[:5])
    _refused(capsys, src, tmp_path / "m.cllm", "model.safetensors", "not a readable safetensors file")


def test_hf_import_refuses_a_tokenizer_larger_than_the_vocabulary(hf_tok, tmp_path, capsys):
    src = _make(tmp_path / "hf", hf_tok, vocab_size=300)
    _refused(capsys, src, tmp_path / "m.cllm", "tokenizer.json",
             f"the tokenizer has {len(hf_tok)} tokens, more than the model's vocabulary of 300")


def test_hf_import_refuses_pickled_weights_with_how_to_convert(hf_tok, tmp_path, capsys):
    src = _make(tmp_path / "hf", hf_tok)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    _refused(capsys, src, tmp_path / "m.cllm", "pytorch_model.bin", "save_pretrained")


@pytest.mark.parametrize("key,value,needle", [
    ("activation_function", "gelu", "activation_function 'gelu'"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon 1e-06"),
    ("scale_attn_weights", False, "scale_attn_weights false"),
])
def test_hf_import_refuses_math_cllmd_does_not_compute(key, value, needle, hf_tok, tmp_path, capsys):
    src = _make(tmp_path / "hf", hf_tok)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, src, tmp_path / "m.cllm", "config.json", needle)


def test_hf_import_refuses_an_untied_head(hf_tok, tmp_path, capsys):
    src = _make(tmp_path / "hf", hf_tok)
    _rewrite(src, lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"] + 1})
    _refused(capsys, src, tmp_path / "m.cllm", "model.safetensors", "lm_head.weight differs")


def test_hf_export_refuses_a_missing_model(tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(tmp_path / "none.cllm"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.cllm" in err
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
