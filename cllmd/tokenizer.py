"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained with Hugging Face `tokenizers`.

Both map any valid Unicode text to int32 ids and back exactly, and give each token's raw bytes
for streaming. "<|endoftext|>" in text is the end-of-text token, as Hugging Face encodes it, so
cllmd's ids and those of its exported tokenizer.json agree on every input.
"""

from __future__ import annotations

import abc
import json
import logging
import operator
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from cllm.durable import atomic_write

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
TOKENIZER_FILENAME = "tokenizer.json"
BYTES_FORMAT_VERSION = 1
MAX_VOCAB_SIZE = 2**31 - 1  # ids are stored as int32

# BPE texts are encoded in pieces of about this many characters, cut only where the result is
# provably the same as for the whole text (see split_for_encoding).
CHUNK_CHARS = 1 << 15
# encode_chunks gives the ids of about this many characters at a time.
REPLY_CHARS = 1 << 20
# encode_stream holds about twice this many characters of text at a time.
STREAM_CHARS = 1 << 20
# encode_stream's second rule: a blank after a non-blank and before a letter. Under GPT-2's
# split pattern (see _SAFE_CUT) a pre-token ends before such a blank in the whole text (only
# the whitespace alternatives take a blank after the first character, and a non-blank
# precedes it), the left piece ends with that same pre-token, and the right piece starts with
# the same " <letters>" pre-token (add_prefix_space adds nothing before a blank): same ids.
_BLANK_CUT = re.compile(r"(?<=\S) (?=[^\W\d_])")


class TokenizerError(ValueError):
    """Bad tokenizer input: an unreadable or invalid tokenizer file, text or ids."""


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards in
    byte order. This is exactly the alphabet of `pre_tokenizers.ByteLevel`.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_UNICODE = _byte_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}


def _lone_surrogate_error(text: str) -> TokenizerError:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return TokenizerError(
            f"text contains a lone surrogate {text[e.start]!r} at index {e.start}; only valid "
            f"Unicode (UTF-8 encodable) text can be tokenized")
    return TokenizerError("text could not be tokenized")


def _check_str(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return text


# A cut before a "\n" that is followed by a printable, non-space ASCII character keeps
# byte-level pre-tokenization unchanged. GPT-2's split pattern is
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# and has no look-behind, so a cut is invisible if (a) a pre-token ends there in the whole text
# and (b) the left piece ends with the same pre-token. Let W be the whitespace run ending in
# that "\n". In the whole text `\s+(?!\S)` backtracks to W minus its last character (the "\n"
# is then matched alone by `\s+` because a non-space follows), so a pre-token ends exactly at
# the cut; at the end of the left piece `\s+(?!\S)` matches the same W minus "\n". No other
# alternative can contain a whitespace character except an optional leading " ", and "\n" is
# not " ". BPE merges never cross pre-tokens, hence ids are identical.
# Special tokens are split out of the text before pre-tokenization, so a "\n" right before one
# ends its segment (where `\s+(?!\S)` keeps it in W): no cut there, hence the look-ahead for
# the tokenizer's special tokens (a tokenizer whose special tokens hold a "\n" is not cut).
_SAFE_CUT = re.compile(r"\n(?=[!-~])(?!<\|endoftext\|>)")


def safe_cut_pattern(specials: Iterable[str]) -> re.Pattern | None:
    """The cut rule of split_for_encoding for a tokenizer with these special tokens, or None
    when no cut is provably safe (a special token containing a newline)."""
    specials = sorted(set(specials), key=len, reverse=True)
    if any("\n" in s for s in specials):
        return None
    avoid = "|".join(re.escape(s) for s in specials)
    return re.compile(r"\n(?=[!-~])" + (f"(?!{avoid})" if avoid else ""))


def split_for_encoding(text: str, chunk_chars: int = CHUNK_CHARS,
                       cut: re.Pattern | None = _SAFE_CUT) -> list[str]:
    """Split `text` into pieces of roughly `chunk_chars` whose encodings concatenate to the
    encoding of the whole text (see the note on _SAFE_CUT); `cut` None: never split."""
    return list(iter_split_for_encoding(text, chunk_chars, cut))


def iter_split_for_encoding(text: str, chunk_chars: int = CHUNK_CHARS,
                            cut: re.Pattern | None = _SAFE_CUT) -> Iterator[str]:
    """split_for_encoding's pieces one at a time (the text is not copied whole)."""
    chunk_chars = max(1, chunk_chars)
    if len(text) <= chunk_chars or cut is None:
        yield text
        return
    start = 0
    while len(text) - start > chunk_chars:
        m = cut.search(text, start + chunk_chars)
        if m is None:
            break
        yield text[start:m.start()]
        start = m.start()
    yield text[start:]


class Tokenizer(abc.ABC):
    """Common interface. Subclasses fill `_table`: token id -> raw bytes (a special token's are
    its text, so that decode(encode(text)) == text holds for every text)."""

    kind: str
    vocab_size: int
    eot_id: int
    _table: list[bytes]

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids (int32, 1-D) of `text`; "<|endoftext|>" inside text is the eot id.

        Any str that is valid Unicode round-trips through decode; a str holding a lone
        surrogate (not UTF-8 encodable, so not text) is refused with TokenizerError.
        """

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def encode_chunks(self, text: str, chunk_chars: int = REPLY_CHARS) -> Iterator[np.ndarray]:
        """encode(text) as consecutive id arrays that concatenate to exactly encode(text), each
        of about chunk_chars characters' ids (the whole array never exists at once).

        Unlike encode_stream, which may cut where no exact cut exists, this cuts only where
        the ids stay those of the whole text: here anywhere outside a special token."""
        _check_str(text)
        chunk_chars = max(1, chunk_chars)
        start = 0
        while start < len(text):
            at = min(len(text), start + chunk_chars)
            while at < len(text) and self._inside_special(text, at):
                at += 1
            try:
                yield self.encode(text[start:at])
            except TokenizerError:
                raise _lone_surrogate_error(text) from None   # its index in the whole text
            start = at

    # the texts of the special tokens (split out of the text before anything else)
    specials: tuple[str, ...] = (EOT,)
    # where a cut is provably invisible (split_for_encoding), None when nowhere
    _cut: re.Pattern | None = _SAFE_CUT

    def encode_stream(self, pieces: Iterable[str],
                      chunk_chars: int = STREAM_CHARS) -> Iterator[np.ndarray]:
        """encode() of the concatenation of `pieces`, as consecutive id arrays, holding about
        2 * chunk_chars characters at a time however long the text.

        Cuts follow split_for_encoding's rule, so the ids are those of the whole text. Where
        4 * chunk_chars characters hold no such cut, the text is cut at a blank between a
        non-blank and a letter (same ids, see _BLANK_CUT), failing that anywhere outside a
        special token: the ids may then differ from the whole text's around that cut, and
        still decode to exactly the text.
        """
        chunk_chars = max(1, chunk_chars)
        buf = ""
        for piece in pieces:
            buf = buf + piece if buf else piece
            while len(buf) >= 2 * chunk_chars:
                at = self._stream_cut(buf, chunk_chars)
                if at is None:
                    break   # wait for more text: the cut may lie just beyond
                yield self.encode(buf[:at])
                buf = buf[at:]
        if buf:
            yield self.encode(buf)

    def _stream_cut(self, buf: str, chunk_chars: int) -> int | None:
        # A cut must see what follows it: the look-ahead of the rule, a special token's text.
        limit = len(buf) - max(map(len, self.specials), default=0) - 1
        if self._cut is not None:
            m = self._cut.search(buf, chunk_chars)
            if m is not None and m.start() <= limit:
                return m.start()
        if len(buf) < 4 * chunk_chars or limit < chunk_chars:
            return None
        for m in _BLANK_CUT.finditer(buf, chunk_chars):
            if m.start() > limit:
                break
            if not self._inside_special(buf, m.start()):
                return m.start()
        at = chunk_chars
        while self._inside_special(buf, at):
            at += 1
        return at

    def _inside_special(self, buf: str, at: int) -> bool:
        for s in self.specials:
            start = buf.find(s, max(0, at - len(s) + 1), at + len(s) - 1)
            if 0 <= start < at:
                return True
        return False

    def _ids_array(self, ids) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1:
            raise TokenizerError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return arr.astype(np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TokenizerError(f"token ids must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise TokenizerError(f"token id {bad} is out of range for vocabulary size "
                                 f"{self.vocab_size}")
        return arr.astype(np.int64, copy=False)

    def decode(self, ids) -> str:
        """Text of `ids`. Special tokens decode to their text ("<|endoftext|>"); byte sequences
        that are not valid UTF-8 (possible for arbitrary ids, never from encode) become U+FFFD."""
        arr = self._ids_array(ids)
        table = self._table
        return b"".join([table[i] for i in arr.tolist()]).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token's text); a streaming decoder joins these."""
        i = operator.index(token_id)
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is out of range for vocabulary size "
                                 f"{self.vocab_size}")
        return self._table[i]

    def token_bytes_table(self) -> list[bytes]:
        """All tokens' raw bytes, indexed by id (do not modify)."""
        return self._table

    @abc.abstractmethod
    def to_json(self) -> str:
        """The self-describing JSON form (stored in .cllm files)."""

    @abc.abstractmethod
    def to_hf_json(self) -> str:
        """A Hugging Face tokenizer.json giving the same ids for every text (for export)."""

    def save(self, path: os.PathLike | str) -> None:
        """Atomically write the JSON form to `path`, or to `path`/tokenizer.json for a dir."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILENAME
        atomic_write(path, self.to_json().encode("utf-8"))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} vocab_size={self.vocab_size} eot_id={self.eot_id}>"


class BytesTokenizer(Tokenizer):
    """256 byte symbols (id = byte value) plus the end-of-text token (id 256)."""

    kind = "bytes"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eot_id = 256
        self._table = [bytes([b]) for b in range(256)] + [EOT.encode("ascii")]

    def decode(self, ids) -> str:
        # an id below 256 is its byte: whole runs of them at once (a 50,000-id detokenize took
        # 2.1 ms of GIL through the table item by item, 1.1 ms so, most of it np.asarray), the
        # end-of-text token's text between runs
        arr = self._ids_array(ids)
        runs, start = [], 0
        for at in np.flatnonzero(arr == self.eot_id).tolist():
            runs.append(arr[start:at].astype(np.uint8).tobytes())
            start = at + 1
        runs.append(arr[start:].astype(np.uint8).tobytes())
        return self._table[self.eot_id].join(runs).decode("utf-8", errors="replace")

    def encode(self, text: str) -> np.ndarray:
        try:
            raw = _check_str(text).encode("utf-8")
        except UnicodeEncodeError:
            raise _lone_surrogate_error(text) from None
        ids = np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
        if EOT.encode("ascii") not in raw:
            return ids
        parts = raw.split(EOT.encode("ascii"))  # the special token is one id, as in HF
        out = np.full(len(raw) - (len(parts) - 1) * (len(EOT) - 1), self.eot_id, dtype=np.int32)
        at = 0
        for part in parts:
            out[at:at + len(part)] = np.frombuffer(part, dtype=np.uint8)
            at += len(part) + 1
        return out

    def to_json(self) -> str:
        return json.dumps({"type": "bytes", "version": BYTES_FORMAT_VERSION,
                           "special_tokens": {EOT: self.eot_id}})

    def to_hf_json(self) -> str:
        # A byte-level BPE without merges whose token for byte b has id b: every byte is its
        # own token, as here; <|endoftext|> is the special token 256.
        hf = HFTokenizer(models.BPE(vocab={_BYTE_TO_UNICODE[b]: b for b in range(256)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        return hf.to_str()


class BPETokenizer(Tokenizer):
    """Byte-level BPE backed by a Hugging Face `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer) -> None:
        hf.no_truncation()
        hf.no_padding()
        # Special tokens in text are special tokens, as HF's default (which a tokenizer.json
        # cannot change): the same ids as any HF tool loading this tokenizer's JSON.
        hf.encode_special_tokens = False
        self._hf = hf
        self.chunk_chars = CHUNK_CHARS
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        eot = hf.token_to_id(EOT)
        added = hf.get_added_tokens_decoder()
        if eot is None or eot not in added or not added[eot].special:
            raise TokenizerError(f"the BPE tokenizer has no special token {EOT!r}")
        self.eot_id = eot
        self.specials = tuple(t.content for t in added.values())
        self._cut = safe_cut_pattern(self.specials)
        self._table = self._build_table(hf, added)

    def _build_table(self, hf: HFTokenizer, added: dict) -> list[bytes]:
        table = [b""] * self.vocab_size
        for token, i in hf.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size:
                raise TokenizerError(f"token id {i} of {token!r} is not below the vocabulary "
                                     f"size {self.vocab_size}")
            if i in added:
                table[i] = added[i].content.encode("utf-8")
                continue
            try:
                table[i] = bytes([_UNICODE_TO_BYTE[c] for c in token])
            except KeyError:
                raise TokenizerError(f"not a byte-level BPE vocabulary: token {token!r} uses "
                                     f"characters outside the byte-level alphabet") from None
        return table

    def _encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        try:
            # Rust side with the GIL released, pieces spread over the rayon pool; the "fast"
            # variant skips offsets and is quicker than encode() even for a single piece.
            return [e.ids for e in self._hf.encode_batch_fast(pieces, add_special_tokens=False)]
        except TypeError:
            # HF refuses str objects holding lone surrogates with a vague TypeError.
            for p in pieces:
                _check_str(p)
                raise _lone_surrogate_error(p) from None
            raise

    def encode(self, text: str) -> np.ndarray:
        pieces = split_for_encoding(_check_str(text), self.chunk_chars, self._cut)
        return _join_ids(self._encode_pieces(pieces))

    def encode_chunks(self, text: str, chunk_chars: int = REPLY_CHARS) -> Iterator[np.ndarray]:
        # encode()'s own pieces (where a cut is provably invisible), encoded a group of about
        # chunk_chars characters at a time: the same ids by construction. A text without
        # such a cut is one piece, as in encode().
        group: list[str] = []
        size = 0
        for piece in iter_split_for_encoding(_check_str(text), self.chunk_chars, self._cut):
            group.append(piece)
            size += len(piece)
            if size >= chunk_chars:
                yield from (np.array(ids, dtype=np.int32) for ids in self._encode_pieces(group))
                group, size = [], 0
        if group:
            yield from (np.array(ids, dtype=np.int32) for ids in self._encode_pieces(group))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        split = [split_for_encoding(_check_str(t), self.chunk_chars, self._cut) for t in texts]
        if not split:
            return []
        # One call for all pieces of all texts, then regroup per text.
        flat = self._encode_pieces([p for pieces in split for p in pieces])
        result, k = [], 0
        for pieces in split:
            result.append(_join_ids(flat[k:k + len(pieces)]))
            k += len(pieces)
        return result

    def to_json(self) -> str:
        return self._hf.to_str()

    def to_hf_json(self) -> str:
        return self._hf.to_str()

    def is_bytes_equivalent(self) -> bool:
        """True for a BPE without merges whose byte b is token b and <|endoftext|> token 256:
        the ids of BytesTokenizer (what BytesTokenizer.to_hf_json writes)."""
        if self.vocab_size != 257 or self.eot_id != 256:
            return False
        return self._table[:256] == [bytes([b]) for b in range(256)] and \
            not json.loads(self._hf.to_str())["model"].get("merges")


def _join_ids(parts: list[list[int]]) -> np.ndarray:
    if len(parts) == 1:
        return np.array(parts[0], dtype=np.int32)
    return np.concatenate([np.array(p, dtype=np.int32) for p in parts])


def _bytes_from_json(obj: dict) -> BytesTokenizer:
    version = obj.get("version")
    if version != BYTES_FORMAT_VERSION:
        raise TokenizerError(f"unsupported bytes tokenizer version {version!r}")
    if obj.get("special_tokens") != {EOT: 256}:
        raise TokenizerError(f"bytes tokenizer must have special_tokens {{{EOT!r}: 256}}")
    return BytesTokenizer()


def _check_bpe_json(obj: dict) -> None:
    model = obj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerError("unsupported tokenizer: the model is not BPE")
    if obj.get("normalizer") is not None:
        raise TokenizerError("unsupported tokenizer: a normalizer would break exact round trips")
    pre = obj.get("pre_tokenizer")
    if not isinstance(pre, dict) or pre.get("type") != "ByteLevel":
        raise TokenizerError("unsupported tokenizer: the pre-tokenizer must be ByteLevel")
    if pre.get("add_prefix_space"):
        raise TokenizerError("unsupported tokenizer: ByteLevel add_prefix_space must be false")


def tokenizer_from_json(text: str) -> Tokenizer:
    """A tokenizer from its `to_json()` form (bytes) or a Hugging Face byte-level BPE JSON."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise TokenizerError(f"tokenizer is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise TokenizerError("tokenizer JSON must be an object")
    if obj.get("type") == "bytes":
        return _bytes_from_json(obj)
    if "model" in obj:
        _check_bpe_json(obj)
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # HF raises a bare Exception on schema errors
            raise TokenizerError(f"invalid Hugging Face tokenizer JSON: {e}") from e
        bpe = BPETokenizer(hf)
        return BytesTokenizer() if bpe.is_bytes_equivalent() else bpe
    raise TokenizerError("unknown tokenizer JSON: expected {\"type\": \"bytes\", ...} or a "
                         "Hugging Face tokenizer.json")


def load_tokenizer(path: os.PathLike | str) -> Tokenizer:
    """Load a tokenizer file (or `path`/tokenizer.json for a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: tokenizer file is not UTF-8 text") from e
    try:
        return tokenizer_from_json(text)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from e


def bpe_from_vocab_merges(vocab: os.PathLike | str, merges: os.PathLike | str) -> BPETokenizer:
    """GPT-2's original tokenizer files (vocab.json + merges.txt) as a byte-level BPE."""
    for path in (vocab, merges):
        if not Path(path).is_file():
            raise TokenizerError(f"{path}: no such file")
    try:
        hf = HFTokenizer(models.BPE.from_file(os.fspath(vocab), os.fspath(merges)))
    except Exception as e:  # HF raises a bare Exception on bad files
        raise TokenizerError(f"{vocab}, {merges}: not a BPE vocabulary and merges: {e}") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    if hf.token_to_id(EOT) is None:
        raise TokenizerError(f"{vocab}: no token {EOT!r}")
    hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])  # keeps its id
    return BPETokenizer(hf)


def _check_vocab_size(vocab_size: object) -> int:
    if isinstance(vocab_size, bool):
        raise TokenizerError(f"vocab_size must be an integer, got {vocab_size!r}")
    try:
        v = operator.index(vocab_size)
    except TypeError:
        raise TokenizerError(f"vocab_size must be an integer, got {vocab_size!r}") from None
    if v < 257:
        raise TokenizerError(f"vocab_size must be at least 257 (256 byte symbols + 1 special "
                             f"token), got {v}")
    if v > MAX_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size must be at most {MAX_VOCAB_SIZE}, got {v}")
    return v


def _training_texts(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read training file: {e.strerror or e}") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: training file is not valid UTF-8 (byte {e.start})"
                                 ) from None
        # The same pieces that encoding uses, so the trainer sees the same pre-tokens.
        yield from split_for_encoding(text)


def train_bpe(files: Iterable[os.PathLike | str] | os.PathLike | str, vocab_size: int,
              min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE with "<|endoftext|>" (id 0) on UTF-8 text files.

    The 256 byte symbols are always in the vocabulary, so no text is ever out of vocabulary;
    `vocab_size` counts them and the special token, and the result can be smaller when the
    text offers fewer merges.
    """
    v = _check_vocab_size(vocab_size)
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) \
            or min_frequency < 0:
        raise TokenizerError(f"min_frequency must be a non-negative integer, got "
                             f"{min_frequency!r}")
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [Path(f) for f in files]
    if not paths:
        raise TokenizerError("no training files given")
    for p in paths:
        if not p.is_file():
            raise TokenizerError(f"{p}: training file does not exist or is not a regular file")

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=v,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_training_texts(paths), trainer=trainer)
    tok = BPETokenizer(hf)
    log.info("trained byte-level BPE on %d files: vocabulary %d (asked %d)",
             len(paths), tok.vocab_size, v)
    return tok


__all__ = [
    "EOT", "BPETokenizer", "BytesTokenizer", "Tokenizer", "TokenizerError", "bpe_from_vocab_merges",
    "load_tokenizer", "safe_cut_pattern", "split_for_encoding", "tokenizer_from_json", "train_bpe",
]
