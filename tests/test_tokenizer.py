"""Tests for the bytes and byte-level BPE tokenizers."""

import itertools
import json
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cllmd.tokenizer import (
    EOT,
    BPETokenizer,
    BytesTokenizer,
    TokenizerError,
    load_tokenizer,
    split_for_encoding,
    tokenizer_from_json,
    train_bpe,
)

WORDS = ["the", "tokenizer", "encodes", "text", "into", "ids", "l'été", "naïve", "日本語",
         "Ελληνικά", "emoji😀", "123", "4.56", "x = y + 1", "don't", "it's", "(a, b)", EOT]
# Whitespace runs of every kind, so that the BPE learns merges across them (" \n", "\n\n",
# "\n ", ...) and encoding tests can tell apart pre-tokenizations that differ only there.
SEPARATORS = [" ", " ", " ", "\n", "\n\n", "\t", "  ", "\r\n", ", ", ". ", " \n", "\n ",
              "\n\n\n", " \n ", "\t\n", "   ", "\n\t"]


def _generated_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n_words))


@pytest.fixture(scope="module")
def training_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "train.txt"
    path.write_text(_generated_text(3000, seed=1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(training_file):
    return train_bpe([training_file], vocab_size=350)


@pytest.fixture(scope="module")
def bpe_all_merges(training_file):
    # Every merge the text offers, including those between whitespace characters.
    tok = train_bpe([training_file], vocab_size=100_000)
    assert {"ĊĊ", "ĠĊ", "ĠĠ"} <= set(tok._hf.get_vocab())
    return tok


# Strings with the characters that matter to byte-level pre-tokenization.
tricky_text = st.text(alphabet=st.sampled_from(list(" \n\r\t'sxA1é日😀.-\u00a0\u2028\x0b")),
                      max_size=120)


def test_bytes_tokenizer_shape():
    tok = BytesTokenizer()
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("bytes", 257, 256)
    ids = tok.encode("hé")
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.tolist() == [104, 0xC3, 0xA9]
    assert tok.encode("").shape == (0,)


@given(st.text())
def test_bytes_round_trip(s):
    tok = BytesTokenizer()
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 256), max_size=300))
def test_bytes_decode_equals_the_bytes_of_each_id_joined(ids):
    # decode takes runs of ids < 256 as their bytes at once: the same text as each id's bytes
    # (token_bytes) joined, invalid UTF-8 replaced, the end-of-text token's text between runs
    tok = BytesTokenizer()
    want = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    assert tok.decode(ids) == want
    assert tok.decode(np.array(ids, dtype=np.int32)) == want


@given(st.text())
def test_bytes_token_bytes_concatenate_to_utf8(s):
    tok = BytesTokenizer()
    assert b"".join(tok.token_bytes(int(i)) for i in tok.encode(s)) == s.encode("utf-8")


@settings(deadline=None)
@given(s=st.text())
def test_bpe_round_trip(bpe, s):
    ids = bpe.encode(s)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert bpe.decode(ids) == s


@settings(deadline=None)
@given(s=st.text())
def test_bpe_token_bytes_concatenate_to_utf8(bpe, s):
    assert b"".join(bpe.token_bytes(int(i)) for i in bpe.encode(s)) == s.encode("utf-8")


def test_bpe_trained_shape_and_merges(bpe):
    assert (bpe.kind, bpe.vocab_size, bpe.eot_id) == ("bpe", 350, 0)
    text = "the tokenizer encodes text into ids"
    # Frequent words were merged: far fewer tokens than bytes.
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2
    assert bpe.decode(bpe.encode("")) == "" and bpe.encode("").dtype == np.int32


@pytest.mark.parametrize("make", [BytesTokenizer, "bpe"])
def test_tokenizer_eot_literal_is_the_eot_token(make, request):
    # As Hugging Face encodes it (issue 11: cllmd and its tokenizer.json must agree).
    tok = request.getfixturevalue("bpe") if make == "bpe" else make()
    s = f"before{EOT}after {EOT}"
    ids = tok.encode(s)
    assert ids.tolist().count(tok.eot_id) == 2 and ids[-1] == tok.eot_id
    assert ids.tolist()[:ids.tolist().index(tok.eot_id)] == tok.encode("before").tolist()
    assert tok.decode(ids) == s
    assert tok.token_bytes(tok.eot_id) == EOT.encode()
    assert tok.encode(EOT).tolist() == [tok.eot_id]
    assert tok.eot_id not in tok.encode("<|endoftext|").tolist() + tok.encode("<|endoftext |>").tolist()


@pytest.mark.parametrize("make", [BytesTokenizer, "bpe"])
def test_tokenizer_refuses_lone_surrogate(make, request):
    tok = request.getfixturevalue("bpe") if make == "bpe" else make()
    with pytest.raises(TokenizerError, match=r"lone surrogate '\\ud800' at index 2"):
        tok.encode("ab\ud800c")
    with pytest.raises(TypeError, match="expected str"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("make", [BytesTokenizer, "bpe"])
def test_tokenizer_decode_refuses_bad_ids(make, request):
    tok = request.getfixturevalue("bpe") if make == "bpe" else make()
    with pytest.raises(TokenizerError, match=f"token id {tok.vocab_size} is out of range"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(TokenizerError, match="token id -1 is out of range"):
        tok.decode(np.array([-1, 3]))
    with pytest.raises(TokenizerError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(TokenizerError, match="must be integers"):
        tok.decode([1.5])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.token_bytes(tok.vocab_size)


def test_tokenizer_decode_invalid_utf8_is_replaced():
    tok = BytesTokenizer()
    assert tok.decode([0x61, 0xC3]) == "a\ufffd"  # a truncated two-byte sequence


def _chunked(tok, chunk):
    small = BPETokenizer(tok._hf)
    small.chunk_chars = chunk
    return small


@settings(deadline=None)
@given(s=tricky_text, chunk=st.integers(1, 8))
def test_bpe_chunked_encoding_equals_whole(bpe_all_merges, s, chunk):
    whole = bpe_all_merges._hf.encode(s, add_special_tokens=False).ids
    assert _chunked(bpe_all_merges, chunk).encode(s).tolist() == whole
    assert "".join(split_for_encoding(s, chunk)) == s


def test_bpe_chunked_encoding_equals_whole_exhaustively(bpe_all_merges):
    # Every string of up to 6 characters over the characters that decide where cuts may go.
    hf = bpe_all_merges._hf
    tokenizers = [_chunked(bpe_all_merges, chunk) for chunk in (1, 2)]
    for n in range(1, 7):
        for chars in itertools.product(" \na\t", repeat=n):
            s = "".join(chars)
            whole = hf.encode(s, add_special_tokens=False).ids
            for tok in tokenizers:
                assert tok.encode(s).tolist() == whole, (s, tok.chunk_chars)


def test_bpe_chunked_encoding_equals_whole_around_special_tokens(bpe_all_merges):
    # A special token is split out before pre-tokenization: no cut right before one.
    hf = bpe_all_merges._hf
    tokenizers = [_chunked(bpe_all_merges, chunk) for chunk in (1, 2, 3)]
    for n in range(1, 6):
        for parts in itertools.product([" ", "\n", "a", EOT], repeat=n):
            s = "".join(parts)
            whole = hf.encode(s, add_special_tokens=False).ids
            for tok in tokenizers:
                assert tok.encode(s).tolist() == whole, (s, tok.chunk_chars)


def test_bpe_chunked_encoding_equals_whole_on_long_multiline_text(bpe_all_merges):
    bpe = bpe_all_merges
    text = _generated_text(40000, seed=2)  # well over one chunk
    pieces = split_for_encoding(text)
    assert len(pieces) > 3
    assert "".join(pieces) == text
    whole = np.array(bpe._hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)
    np.testing.assert_array_equal(bpe.encode(text), whole)


def _joined_chunks(tok, text, chunk_chars):
    chunks = list(tok.encode_chunks(text, chunk_chars))
    assert all(c.dtype == np.int32 for c in chunks)
    return chunks, (np.concatenate(chunks) if chunks else np.zeros(0, np.int32))


def test_bpe_encode_chunks_equal_encode(bpe_all_merges):
    # tokenize's reply is built from these: the ids must be exactly encode()'s
    bpe = _chunked(bpe_all_merges, 64)
    text = _generated_text(20000, seed=3) + "one line with no cut " * 200
    for chunk_chars in (1, 100, 5000, 1 << 20):
        chunks, ids = _joined_chunks(bpe, text, chunk_chars)
        np.testing.assert_array_equal(ids, bpe.encode(text))
        assert len(chunks) > 10
    assert _joined_chunks(bpe, "", 10)[1].tolist() == []


@settings(deadline=None)
@given(parts=st.lists(st.sampled_from(list("ab é日😀") + [EOT, "<|", "|>"]), max_size=30),
       chunk=st.integers(1, 9))
def test_bytes_encode_chunks_equal_encode_around_special_tokens(parts, chunk):
    tok, s = BytesTokenizer(), "".join(parts)
    assert _joined_chunks(tok, s, chunk)[1].tolist() == tok.encode(s).tolist()


def test_encode_chunks_refuse_a_lone_surrogate_at_its_index_in_the_whole_text(bpe):
    text = "a" * 100 + "\ud800"
    for tok in (BytesTokenizer(), bpe):
        with pytest.raises(TokenizerError, match="index 100"):
            list(tok.encode_chunks(text, 10))


def test_bpe_encode_batch_equals_single_encodes(bpe):
    texts = [_generated_text(n, seed=n) for n in (0, 1, 50, 20000)] + ["", "x"]
    batch = bpe.encode_batch(texts)
    assert len(batch) == len(texts)
    for t, ids in zip(texts, batch):
        np.testing.assert_array_equal(ids, bpe.encode(t))
        assert ids.dtype == np.int32
    assert bpe.encode_batch([]) == []


def test_bytes_encode_batch_equals_single_encodes():
    tok = BytesTokenizer()
    texts = ["abc", "", "日本"]
    assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.encode(t).tolist()
                                                          for t in texts]


@pytest.mark.parametrize("make", [BytesTokenizer, "bpe"])
def test_tokenizer_save_load_round_trip(make, request, tmp_path):
    tok = request.getfixturevalue("bpe") if make == "bpe" else make()
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (tok.kind, tok.vocab_size,
                                                              tok.eot_id)
    text = _generated_text(500, seed=3)
    np.testing.assert_array_equal(loaded.encode(text), tok.encode(text))
    assert loaded.token_bytes_table() == tok.token_bytes_table()
    assert loaded.encode(f"a{EOT}b").tolist() == tok.encode(f"a{EOT}b").tolist()
    # Saving into a directory writes tokenizer.json there; loading the directory finds it.
    tok.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tok.json", "tokenizer.json"]
    assert load_tokenizer(tmp_path).to_json() == tok.to_json()
    assert tokenizer_from_json(tok.to_json()).encode(text).tolist() == tok.encode(text).tolist()


def test_bytes_tokenizer_json_is_self_describing():
    obj = json.loads(BytesTokenizer().to_json())
    assert obj["type"] == "bytes" and obj["special_tokens"] == {EOT: 256}


def test_bpe_json_is_huggingface_tokenizer_json(bpe):
    obj = json.loads(bpe.to_json())
    assert obj["model"]["type"] == "BPE"
    assert obj["pre_tokenizer"]["type"] == "ByteLevel"
    assert any(t["content"] == EOT and t["special"] for t in obj["added_tokens"])


def test_train_bpe_is_deterministic(training_file, bpe):
    again = train_bpe([training_file], vocab_size=350)
    assert again.to_json() == bpe.to_json()


@pytest.mark.parametrize("vocab_size, problem", [
    (256, "at least 257"), (0, "at least 257"), (-5, "at least 257"),
    (2**31, "at most"), ("300", "must be an integer"), (300.0, "must be an integer"),
    (True, "must be an integer"),
])
def test_train_bpe_refuses_bad_vocab_size(training_file, vocab_size, problem):
    with pytest.raises(TokenizerError, match=problem):
        train_bpe([training_file], vocab_size=vocab_size)


def test_train_bpe_minimum_vocab_is_bytes_plus_eot(training_file):
    tok = train_bpe(training_file, vocab_size=257)
    assert tok.vocab_size == 257
    s = "any text at all: ʕ•ᴥ•ʔ"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(s)) == len(s.encode("utf-8"))


def test_train_bpe_refuses_bad_files(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(TokenizerError, match=r"missing\.txt: training file does not exist"):
        train_bpe([missing], vocab_size=300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(TokenizerError, match=r"latin1\.txt: training file is not valid UTF-8"):
        train_bpe([latin1], vocab_size=300)
    with pytest.raises(TokenizerError, match="no training files"):
        train_bpe([], vocab_size=300)
    good = tmp_path / "good.txt"
    good.write_text("hello hello hello\n")
    with pytest.raises(TokenizerError, match="min_frequency"):
        train_bpe([good], vocab_size=300, min_frequency=-1)


def test_load_tokenizer_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match=r"nope\.json: cannot read tokenizer"):
        load_tokenizer(missing)
    cases = {
        "garbage.json": ("{not json", "not valid JSON"),
        "list.json": ("[1, 2]", "must be an object"),
        "other.json": ('{"type": "sentencepiece"}', "unknown tokenizer JSON"),
        "bytesv9.json": ('{"type": "bytes", "version": 9}', "unsupported bytes tokenizer"),
        "wordpiece.json": ('{"model": {"type": "WordPiece"}}', "model is not BPE"),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(TokenizerError, match=problem) as ei:
            load_tokenizer(path)
        assert str(path) in str(ei.value)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TokenizerError, match=r"binary\.json: tokenizer file is not UTF-8"):
        load_tokenizer(binary)


def test_load_tokenizer_refuses_lossy_bpe_json(bpe, tmp_path):
    obj = json.loads(bpe.to_json())
    obj["pre_tokenizer"]["add_prefix_space"] = True
    path = tmp_path / "prefix.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(TokenizerError, match="add_prefix_space must be false"):
        load_tokenizer(path)
    obj = json.loads(bpe.to_json())
    obj["added_tokens"] = []
    del obj["model"]["vocab"][EOT]
    path.write_text(json.dumps(obj))
    with pytest.raises(TokenizerError, match="no special token"):
        load_tokenizer(path)


def _streamed(tok, pieces, chunk):
    return np.concatenate(list(tok.encode_stream(pieces, chunk)) or [np.zeros(0, np.int32)])


def _cut_into(text, rng, most):
    out, at = [], 0
    while at < len(text):
        n = rng.randint(1, most)
        out.append(text[at:at + n])
        at += n
    return out


@settings(deadline=None)
@given(s=tricky_text, extra=st.integers(0, 3), seed=st.integers(0, 100))
def test_tokenizer_encode_stream_equals_whole(bpe_all_merges, s, extra, seed):
    # Below 4 chunks without a cut it cuts only where the ids stay those of the whole text,
    # however the pieces arrive.
    pieces = _cut_into(s, random.Random(seed), 7)
    chunk = len(s) // 4 + 1 + extra
    for tok in (bpe_all_merges, BytesTokenizer()):
        assert _streamed(tok, pieces, chunk).tolist() == tok.encode(s).tolist()


@settings(deadline=None)
@given(s=st.lists(st.sampled_from(list(" \naé日.") + [EOT]), max_size=200).map("".join),
       chunk=st.integers(1, 6), seed=st.integers(0, 100))
def test_tokenizer_encode_stream_always_decodes_to_the_text(bpe_all_merges, s, chunk, seed):
    pieces = _cut_into(s, random.Random(seed), 7)
    for tok in (bpe_all_merges, BytesTokenizer()):
        ids = _streamed(tok, pieces, chunk)
        assert tok.decode(ids) == s
        assert (ids == tok.eot_id).sum() == s.count(EOT)


def test_tokenizer_encode_stream_cuts_long_lines_at_blanks_with_the_same_ids(bpe_all_merges):
    # Long lines without a newline cut: the blank rule keeps the ids of the whole text.
    rng = random.Random(3)
    words = [w for w in WORDS if "\n" not in w] + ["x", "日本語", "emoji😀"]
    text = " ".join(rng.choice(words) + rng.choice(["", ",", ".", "  ", "\t"]) for _ in range(3000))
    pieces = _cut_into(text, rng, 500)
    arrays = list(bpe_all_merges.encode_stream(pieces, 300))
    assert len(arrays) > 10 and max(len(a) for a in arrays) < 4 * 300 + 100
    np.testing.assert_array_equal(np.concatenate(arrays), bpe_all_merges.encode(text))


def test_tokenizer_encode_stream_bounds_text_without_any_blank(bpe_all_merges):
    # No cut keeps the ids: the text is still cut (outside special tokens) and decodes exactly.
    text = ("a" * 997 + EOT) * 40
    for tok in (bpe_all_merges, BytesTokenizer()):
        arrays = list(tok.encode_stream([text[i:i + 1000] for i in range(0, len(text), 1000)], 500))
        assert len(arrays) > 10
        ids = np.concatenate(arrays)
        assert tok.decode(ids) == text
        assert (ids == tok.eot_id).sum() == 40   # never a special token cut in two
