"""
Byte-level BPE: the tokenizer every model file of this project shares.

Byte Pair Encoding (Sennrich et al., 2016) learns to fuse the most frequent pair of
adjacent symbols into a new symbol, one merge at a time. Byte-level BPE (GPT-2, Radford
et al., 2019) starts from the 256 bytes, so any text has tokens. Encoding applies the
merges in the order they were learned.

    python bpe.py train --vocab-size 3000 --data DIR --out PATH
    python bpe.py encode --tokenizer PATH "Привет, мир!"
    python bpe.py decode --tokenizer PATH 1017 44 612
"""

import argparse
import codecs
import hashlib
import heapq
import importlib.util
import json
import multiprocessing
import os
import signal
import sys
import time
import unicodedata
from array import array
from collections import Counter, defaultdict
from functools import cached_property
from itertools import chain, pairwise
from operator import add
from pathlib import Path

import regex

# -----------------------------------------------------------------------------
# 1. The textbook trainer
#
# Pre-tokenization: a regex cuts text into chunks, and merges never cross them. GPT-2's
# pattern: English contractions, then runs of letters, of digits or of other symbols, each
# led by at most one space. A run of spaces leaves its last one to the next word (" word").
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Separates documents; ordinary text never produces it.
EOT = "<|endoftext|>"
# Token arrays on disk hold 2 bytes per token.
MAX_VOCAB_SIZE = 2**16


def count_chunks(texts, pattern=GPT2_PATTERN):
    """How often each chunk of `texts` occurs, so that each distinct chunk is trained once.
    >>> count_chunks(["a cat, a hat; a cat"])
    Counter({' cat': 2, ' a': 2, 'a': 1, ',': 1, ' hat': 1, ';': 1})"""
    compiled = regex.compile(pattern)
    counts = Counter()
    for text_counts in parallel_map(lambda text: Counter(compiled.findall(text)), texts):
        counts.update(text_counts)
    return counts


def get_pair_counts(chunks):
    """How often token a is followed by token b, {(a, b): count}, in {ids: count}.
    >>> get_pair_counts({(1, 2, 3): 1, (1, 2): 2})
    Counter({(1, 2): 3, (2, 3): 1})"""
    pair_counts = Counter()
    for ids, count in chunks.items():
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += count
    return pair_counts


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`.
    >>> merge((1, 2, 3, 1, 2), (1, 2), 256), merge((5, 5, 5), (5, 5), 256)
    ((256, 3, 256), (256, 5))"""
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


def train_reference(chunk_counts, n_merges):
    """BPE training as Sennrich et al. state it, on {chunk: count}. A chunk starts as its
    UTF-8 bytes. Each round merges the most frequent pair (ties: the smallest) into a new id
    256, 257, ... Returns up to n_merges merges [(a, b), ...]. With a = 97 and b = 98:
    >>> train_reference({"aaab": 1, "ab": 2}, 3)
    [(97, 98), (97, 97), (257, 256)]"""
    chunks = {tuple(chunk.encode("utf-8")): n for chunk, n in chunk_counts.items()}
    merges = []
    while len(merges) < n_merges:
        pair_counts = get_pair_counts(chunks)
        # Every chunk is a single token: nothing is left to merge.
        if not pair_counts:
            break
        pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        chunks = {merge(ids, pair, 256 + len(merges)): n for ids, n in chunks.items()}
        merges.append(pair)
    return merges


# -----------------------------------------------------------------------------
# 2. The fast trainer
#
# The same merges, with three changes:
# - A chunk is a str with one character chr(id) per token, so that merging "ab" into n is
#   `chunk.replace("ab", chr(n))`, in C. Pairs are 2-character strings, which sort as (a, b).
# - A merge changes only the pairs beside its occurrences, in the chunks that an index
#   {pair: chunk numbers} lists: pair counts are updated, not recounted.
# - The most frequent pair comes from a heap of (-count, pair). Counts only fall, except
#   for new pairs (pushed when made), so an entry whose count fell is pushed back.
def train_fast(chunk_counts, n_merges, log=None):
    """The merges of `train_reference`, found as above. `log` (print) gets progress lines."""
    chunks = [chunk.encode("utf-8").decode("latin-1") for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for i, chunk in enumerate(chunks):
        for k in range(len(chunk) - 1):
            pair = chunk[k : k + 2]
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    last_log = time.time()
    while len(merges) < n_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -negative_count:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        new = chr(256 + len(merges))
        created = merge_everywhere(pair, new, chunks, counts, pair_counts, where)
        for new_pair, count in created.items():
            heapq.heappush(heap, (-count, new_pair))
        merges.append((ord(pair[0]), ord(pair[1])))
        if log and time.time() - last_log > 2:
            last_log = time.time()
            log(f"{len(merges)}/{n_merges} merges")
    return merges


def merge_everywhere(pair, new, chunks, counts, pair_counts, where):
    """Merge `pair` into `new` in every chunk that holds it, updating the counts and the
    index; return {created pair: count}. "x a b y" -> "x n y": (x, a), (a, b), (b, y) lose
    the chunk's count, (x, n) and (n, y) gain it. In "a b a b" -> "n n", (b, a) is (n, n)."""
    a, b = pair
    created = defaultdict(int)
    for i in where.pop(pair):
        chunk = chunks[i]
        # The index is lazy: an earlier merge may have taken this occurrence.
        if pair not in chunk:
            continue
        n = counts[i]
        merged = chunks[i] = chunk.replace(pair, new)
        k = merged.find(new)
        while k != -1:
            if k > 0:
                left = merged[k - 1]
                pair_counts[(b if left == new else left) + a] -= n
                created[left + new] += n
                where[left + new].add(i)
            if k + 1 < len(merged) and merged[k + 1] != new:
                right = merged[k + 1]
                pair_counts[b + right] -= n
                created[new + right] += n
                where[new + right].add(i)
            k = merged.find(new, k + 1)
    del pair_counts[pair]
    pair_counts.update(created)
    return created


# -----------------------------------------------------------------------------
# 3. GPT-2's files and the Tokenizer
#
# GPT-2's vocab.json and merges.txt (and our tokenizer.json) write a token with one
# printable stand-in per byte (GPT-2's bytes_to_unicode): printable Latin-1 bytes stand
# for themselves, the others for U+0100, U+0101, ... So " cat" is "Ġcat".
PRINTABLE = {
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
}
UNPRINTABLE = sorted(set(range(256)) - PRINTABLE)
BYTE_STAND_INS = {
    **{b: chr(b) for b in PRINTABLE},
    **{b: chr(256 + i) for i, b in enumerate(UNPRINTABLE)},
}
STAND_IN_BYTES = {c: b for b, c in BYTE_STAND_INS.items()}


def piece_to_bytes(piece):
    """The bytes of a token as vocab.json writes it ("Ġcat" -> b" cat"). Raises ValueError
    for a character that stands for no byte."""
    try:
        return bytes(STAND_IN_BYTES[c] for c in piece)
    except KeyError as e:
        raise ValueError(f"token {piece!r} has a character ({e.args[0]!r}) "
                         f"that stands for no byte") from None


class Tokenizer:
    """Byte-level BPE: a vocabulary {id: bytes} (the 256 bytes and a token per merge), the
    merges in the order learned, and special tokens ({name: id}) that no text produces.
    Ours number bytes 0..255, merge i 256 + i, special tokens last; GPT-2's files number
    them otherwise, so ids are looked up, never computed."""

    # What a tokenizer.json may ask for: NFC first (Qwen), and a chunk that is a token taken
    # whole (Llama 3).
    nfc = False
    ignore_merges = False

    def __init__(self, merges, special_tokens=None, pattern=GPT2_PATTERN, vocab=None):
        self.merges = [tuple(pair) for pair in merges]
        if vocab is None:
            vocab = {b: bytes([b]) for b in range(256)}
            for a, b in self.merges:
                vocab[len(vocab)] = vocab[a] + vocab[b]
        self.vocab = vocab
        if special_tokens is None:
            special_tokens = {EOT: len(vocab)}
        self.special_tokens = special_tokens
        # A text starts and ends with <|endoftext|>; tokenizer.json may say otherwise.
        self.bos_id = special_tokens.get(EOT)
        self.eos_id = self.bos_id
        self.add_bos = True
        # One regex, or (from tokenizer.json) several that cut in turn.
        self.pattern = pattern
        patterns = [pattern] if isinstance(pattern, str) else pattern
        self._compiled = [regex.compile(p) for p in patterns]
        specials = {id: name.encode("utf-8") for name, id in special_tokens.items()}
        tokens = {**vocab, **specials}
        if sorted(tokens) != list(range(len(vocab) + len(special_tokens))):
            raise ValueError("token ids must be 0, 1, 2, ... with no gap and no id given twice")
        self._bytes = [tokens[id] for id in range(len(tokens))]
        self.vocab_size = len(self._bytes)
        # Encoding works on strings of chr(id), as the fast trainer does: each byte maps to
        # its id, and each merge "ab" to its rank and its merged id.
        self._id_of = {token: id for id, token in vocab.items()}
        try:
            self._byte_ids = {b: chr(self._id_of[bytes([b])]) for b in range(256)}
            self._merged = [chr(self._id_of[vocab[a] + vocab[b]]) for a, b in self.merges]
        except KeyError as e:
            raise ValueError(f"the vocabulary lacks the token {e.args[0]!r}") from None
        self._ranks = {chr(a) + chr(b): rank for rank, (a, b) in enumerate(self.merges)}
        self._cache = {}

    @classmethod
    def train(cls, texts, vocab_size, log=None):
        """Learn vocab_size - 257 merges from `texts` (str), plus <|endoftext|>.
        Raises ValueError unless 257 <= vocab_size <= 2**16."""
        n_merges = vocab_size - 256 - 1
        if not 257 <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be between 257 and {MAX_VOCAB_SIZE}, "
                             f"got {vocab_size}")
        merges = train_fast(count_chunks(list(texts)), n_merges, log)
        if log and len(merges) < n_merges:
            log(f"the text has only {len(merges)} merges: vocabulary {257 + len(merges)}")
        return cls(merges)

    @classmethod
    def from_pretrained(cls, folder):
        """A Hugging Face folder's tokenizer.json (read_tokenizer_json), or GPT-2's vocab.json
        ({token: id}) and merges.txt ("a b" a line, by rank). Raises ValueError if corrupt."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return read_tokenizer_json(folder)
        try:
            token2id = json.loads((folder / "vocab.json").read_text(encoding="utf-8-sig"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8-sig").splitlines()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{folder} lacks {Path(e.filename).name}: a tokenizer is "
                                    f"tokenizer.json, or vocab.json + merges.txt") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder}'s vocab.json or merges.txt is not GPT-2's ({e})") from None
        pairs = [line.split(" ") for line in lines if line and not line.startswith("#version")]
        if not isinstance(token2id, dict) or any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{folder} holds no GPT-2 tokenizer: vocab.json must map tokens "
                             f"to ids, each line of merges.txt be two tokens")
        try:
            merges = [(token2id[a], token2id[b]) for a, b in pairs]
        except KeyError as e:
            raise ValueError(f"{folder}/merges.txt names {e.args[0]!r}, "
                             f"which vocab.json lacks") from None
        # A token that is neither a byte nor made by a merge is a special token.
        made = set(BYTE_STAND_INS.values()) | {a + b for a, b in pairs}
        vocab = {id: piece_to_bytes(piece) for piece, id in token2id.items() if piece in made}
        special = {piece: id for piece, id in token2id.items() if piece not in made}
        tok = cls(merges, special, GPT2_PATTERN, vocab)
        # GPT-2's tokenizer puts nothing before a prompt.
        tok.add_bos = False
        return tok

    def save_pretrained(self, folder):
        """Write the files `from_pretrained` reads: tokenizer.json and tokenizer_config.json
        (write_tokenizer_json), and GPT-2's vocab.json and merges.txt."""
        folder = Path(folder)
        write_tokenizer_json(self, folder)
        write_json(folder / "vocab.json", self.to_dict()["token2id"])
        merges = [f"{self._stand_in(a)} {self._stand_in(b)}" for a, b in self.merges]
        merges_txt = "\n".join(["#version: 0.2", *merges, ""])
        write_atomically(folder / "merges.txt", merges_txt.encode("utf-8"))

    @property
    def eot_id(self):
        return self.special_tokens[EOT]

    def encode(self, text):
        """Text -> ids. Special-token names in the text are encoded as text."""
        chunks = self.split(self.normalize(text))
        for chunk in set(chunks).difference(self._cache):
            self._cache[chunk] = self._encode_chunk(chunk)
        return list(chain.from_iterable(map(self._cache.__getitem__, chunks)))

    def normalize(self, text):
        """The text as the merges see it."""
        if self.nfc:
            return unicodedata.normalize("NFC", text)
        return text

    def split(self, text):
        """Pre-tokenization: the chunks that merges never cross, cut by each pattern in turn."""
        chunks = [text]
        for pattern in self._compiled:
            chunks = [piece for chunk in chunks for piece in isolate(pattern, chunk)]
        return chunks

    def _encode_chunk(self, chunk):
        data = chunk.encode("utf-8")
        if self.ignore_merges and data in self._id_of:
            return [self._id_of[data]]
        symbols = data.decode("latin-1").translate(self._byte_ids)
        return merge_ranked(symbols, self._ranks, self._merged)

    def encode_prompt(self, text):
        """The ids a model continues: the text's, after the beginning-of-text token where the
        tokenizer puts one (as AutoTokenizer(folder)(text) does), or for no text."""
        ids = self.encode(text)
        if self.add_bos or not ids:
            if self.bos_id is None:
                raise ValueError("a blank prompt needs a beginning-of-text token; this "
                                 "tokenizer has none")
            ids = [self.bos_id] + ids
        return ids

    def decode_bytes(self, ids):
        """Ids -> their bytes, perhaps cut inside a character. ValueError for a bad id."""
        if bad := [id for id in ids if not 0 <= id < self.vocab_size]:
            raise ValueError(f"token id {bad[0]} is out of range "
                             f"for a vocabulary of {self.vocab_size}")
        return b"".join([self._bytes[id] for id in ids])

    def decode(self, ids):
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_stream(self, ids, continuing=True):
        """Yield the text of ids as a model generates them. A character cut between two
        tokens (half a Cyrillic letter) waits for its rest. `continuing` (whether the ids
        follow a text) changes nothing in byte-level BPE."""
        pieces = (self.decode_bytes([id]) for id in ids)
        return codecs.iterdecode(pieces, "utf-8", errors="replace")

    def piece(self, id):
        """A token as one readable line: \\xd0 for part of a character, \\n for a control."""
        text = self._bytes[id].decode("utf-8", errors="backslashreplace")
        escaped = [c if c.isprintable() else c.encode("unicode_escape").decode() for c in text]
        return "".join(escaped)

    def char_counts(self):
        """The characters each id adds to decoded text (0 for special tokens), so that loss
        per character compares models whose tokenizers differ."""
        specials = set(self.special_tokens.values())
        # A UTF-8 character starts with a byte that is not 10xxxxxx.
        counts = [sum((b & 0xC0) != 0x80 for b in token) for token in self._bytes]
        return [0 if id in specials else n for id, n in enumerate(counts)]

    def to_dict(self):
        """The fields of our tokenizer.json, which decide every id."""
        pieces = [self._stand_in(id) for id in range(self.vocab_size)]
        return {
            "format": "bpe.py byte-level BPE",
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "merges": [list(pair) for pair in self.merges],
            "token2id": {piece: id for id, piece in enumerate(pieces)},
            "id2token": {str(id): piece for id, piece in enumerate(pieces)},
        }

    def _stand_in(self, id):
        if id in self.vocab:
            return "".join(BYTE_STAND_INS[b] for b in self._bytes[id])
        # A special token is written as itself.
        return self._bytes[id].decode("utf-8")

    @cached_property
    def fingerprint(self):
        """SHA-256 of the fields (not of the file's bytes), which checkpoints store."""
        return sha256(json.dumps(self.to_dict(), sort_keys=True))

    def save(self, path):
        """Write our tokenizer.json, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        """Read a tokenizer.json written by `save`. Raises FileNotFoundError if it is
        missing, ValueError if it is not ours, truncated or inconsistent."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a valid tokenizer file "
                             f"(truncated or corrupt: {e})") from None
        if not isinstance(data, dict) or data.get("format") != "bpe.py byte-level BPE":
            raise ValueError(f"{path} is not a tokenizer written by bpe.py")
        try:
            specials = data["special_tokens"]
            pieces = data["id2token"].items()
            vocab = {int(id): piece_to_bytes(p) for id, p in pieces if p not in specials}
            tok = cls(data["merges"], specials, data["pattern"], vocab)
            if tok.to_dict() == data:
                return tok
        except (KeyError, TypeError, ValueError, IndexError, regex.error):
            pass
        raise ValueError(f"{path} is corrupt: its merges, vocabulary and ids do not agree")


def isolate(pattern, text):
    """text cut into a regex's matches and the text between them (Split, "Isolated")."""
    matches = pattern.findall(text)
    # No text between the matches (GPT-2's pattern matches any): they are all.
    if not pattern.groups and sum(map(len, matches)) == len(text):
        return matches
    cuts = [0, *chain.from_iterable(m.span() for m in pattern.finditer(text)), len(text)]
    return [text[a:b] for a, b in pairwise(cuts) if a < b]


# Encoding merges the pair learned earliest, leftmost first, as `merge` does. Scanning for it
# at each merge is quadratic in a long chunk (a 200,000-letter line), so pairs wait in a heap
# as rank * n + position; a merge pushes the two pairs it makes, and a stale pair is skipped.
def merge_ranked(symbols, ranks, merged):
    """Merge `symbols` (a str of chr(id)) by rank: ranks maps a pair ("ab") to its rank,
    merged[rank] is its token. Returns the ids."""
    s = list(symbols)
    n = len(s)
    # A doubly linked list: a merged-away token becomes "" and is stepped over.
    after = list(range(1, n + 1))
    before = list(range(-1, n - 1))
    heap = [ranks[pair] * n + i for i, pair in enumerate(map(add, s, s[1:])) if pair in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = divmod(heapq.heappop(heap), n)
        j = after[i]
        if j == n or ranks.get(s[i] + s[j]) != rank:
            continue
        s[i] = merged[rank]
        s[j] = ""
        k = after[j]
        after[i] = k
        if k < n:
            before[k] = i
        # The two pairs the merged token makes with its neighbours.
        for left, right in (before[i], i), (i, k):
            new_rank = None
            if left >= 0 and right < n:
                new_rank = ranks.get(s[left] + s[right])
            if new_rank is not None:
                heapq.heappush(heap, new_rank * n + left)
    return [ord(token) for token in s if token]


def sha256(text):
    """The SHA-256 of a string's UTF-8 bytes, in hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_atomically(path, data):
    """Write bytes so that a crash leaves the old file or the new one, never half: a temp
    file beside it, then a rename. Raises OSError naming `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, data):
    """Write data as UTF-8 JSON, atomically."""
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    write_atomically(path, text.encode("utf-8"))


# -----------------------------------------------------------------------------
# 4. Released tokenizers: tokenizer.json, and the other BPE
#
# A Hugging Face tokenizer.json holds a normalizer, a pre-tokenizer, a BPE, a post-processor,
# a decoder and special tokens (added_tokens). Its BPE is byte-level (Llama 3, Qwen, GPT-OSS,
# DeepSeek-V3, SmolLM: a Tokenizer with their split patterns) or SentencePiece's (Llama 2,
# Mistral, Mixtral, Gemma). Any other part is refused by name: a tokenizer half understood
# gives wrong ids silently.
SPACE = "\u2581"  # "▁", SentencePiece's space
BYTE_PIECE = regex.compile(r"<0x([0-9A-F]{2})>")


class SentencePieceBPE(Tokenizer):
    """SentencePiece's BPE (Kudo and Richardson, 2018). A space is "▁", merges join
    characters, and a character that no piece holds is its UTF-8 bytes' pieces <0x00>..<0xFF>
    (byte fallback). Llama's (not Gemma's) puts "▁" first, which decoding drops:

        pieces ▁ a b ab ▁a ▁ab, merges in order (a, b), (▁, a), (▁, ab):
        "ab ab" -> ▁ab▁ab -> ▁ a b ▁ a b -> ▁ ab ▁ ab -> ▁ab ▁ab

    pieces: {piece: id}; merges: [(piece, piece)] by rank; special_tokens: {name: id};
    prefix: "always" ("▁" before any text, Llama 2), "first" (before a text that lacks one,
    Metaspace) or None (Gemma); split: cut before each "▁". ValueError without byte pieces."""

    def __init__(self, pieces, merges, special_tokens, prefix="always", split=False):
        # Not Tokenizer's: the ids are the pieces', and merges join characters.
        self.special_tokens = special_tokens
        self.prefix = prefix
        # read_tokenizer_json sets the beginning- and end-of-text tokens.
        self.bos_id = None
        self.eos_id = None
        self.add_bos = False
        matches = {id: BYTE_PIECE.fullmatch(piece) for piece, id in pieces.items()}
        self._byte = {id: int(m[1], 16) for id, m in matches.items() if m}
        tokens = {id: piece.replace(SPACE, " ").encode("utf-8") for piece, id in pieces.items()}
        tokens |= {id: bytes([b]) for id, b in self._byte.items()}
        tokens |= {id: name.encode("utf-8") for name, id in special_tokens.items()}
        if len(set(self._byte.values())) < 256 or sorted(tokens) != list(range(len(tokens))):
            raise ValueError("SentencePiece's ids must be 0, 1, 2, ..., with the 256 byte pieces")
        self._bytes = [tokens[id] for id in range(len(tokens))]
        self.vocab_size = len(tokens)
        # As in Tokenizer, a str of chr(id): a character is its piece, or its bytes' pieces.
        chars = {ord(p): chr(id) for p, id in pieces.items() if len(p) == 1}
        self._symbols = ByteFallback(chars, {b: id for id, b in self._byte.items()})
        self._ranks = {chr(pieces[a]) + chr(pieces[b]): rank for rank, (a, b) in enumerate(merges)}
        self._merged = [chr(pieces[a + b]) for a, b in merges]
        self._cache = {}
        # Unless a merge makes "x▁" (SentencePiece's do not), cutting before each run of "▁"
        # changes no id, and a word that repeats is encoded once.
        crossing = any(regex.search(f"[^{SPACE}]{SPACE}", a + b) for a, b in merges)
        self._compiled = []
        if split:
            self._compiled = [regex.compile(f"[^{SPACE}]+|{SPACE}[^{SPACE}]*")]
        elif not crossing:
            self._compiled = [regex.compile(f"{SPACE}+[^{SPACE}]*|[^{SPACE}]+")]

    def normalize(self, text):
        """Spaces as "▁", and the prefix "▁" where this tokenizer puts one."""
        text = text.replace(" ", SPACE)
        lacks = text and not text.startswith(SPACE)
        if (self.prefix == "always" and text) or (self.prefix == "first" and lacks):
            text = SPACE + text
        return text

    def _encode_chunk(self, chunk):
        return merge_ranked(chunk.translate(self._symbols), self._ranks, self._merged)

    def decode(self, ids):
        """Ids -> text, without the first space: the "▁" that encoding put first (or, as
        `tokenizers` decodes it, a space found there)."""
        return "".join(self.decode_stream(ids, continuing=False))

    def decode_stream(self, ids, continuing=True):
        """Yield the text of ids as they come: the rest of a text, or (not continuing) a text
        from its start, whose first space decode drops."""
        start = self.prefix and not continuing
        for text in self._fused(ids):
            if start and text:
                text = text.removeprefix(" ")
                start = False
            yield text

    def _fused(self, ids):
        """The pieces' text. A run of byte pieces waits for its end: its UTF-8 text, or if
        invalid one U+FFFD per byte, as `tokenizers` decodes it."""
        run = []
        for id in ids:
            data = self.decode_bytes([id])
            if id in self._byte:
                run.append(self._byte[id])
                continue
            if run:
                yield fuse_bytes(run)
                run = []
            yield data.decode("utf-8")
        if run:
            yield fuse_bytes(run)


class ByteFallback(dict):
    """str.translate's table: a character's piece, or its UTF-8 bytes' <0xNN> pieces."""

    def __init__(self, chars, byte_ids):
        super().__init__(chars)
        self.byte_ids = byte_ids

    def __missing__(self, code):
        self[code] = "".join(chr(self.byte_ids[b]) for b in chr(code).encode("utf-8"))
        return self[code]


def fuse_bytes(run):
    """A run of byte pieces' bytes as text, as `tokenizers` fuses them."""
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def read_json(path, missing=None):
    """The JSON object in a file, or `missing` (if given) where there is no file. Raises
    FileNotFoundError, or ValueError if the file holds no JSON object."""
    if missing is not None and not Path(path).is_file():
        return missing
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no such file: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no JSON object")
    return data


def refuse(path, what, value):
    """The error for a part of tokenizer.json that bpe.py does not compute."""
    return ValueError(f"{path} has a {what} that bpe.py does not compute: "
                      f"{json.dumps(value)[:120]}")


def steps(part):
    """The steps of a part of tokenizer.json: a Sequence's, or itself."""
    for key in ("pretokenizers", "normalizers", "processors", "decoders"):
        if part and key in part:
            return part[key]
    return [part] if part else []


# Plain BPE: no dropout, no word markers.
PLAIN_BPE = {
    "type": "BPE",
    "dropout": None,
    "continuing_subword_prefix": None,
    "end_of_word_suffix": None,
}


def read_tokenizer_json(folder):
    """A folder's tokenizer.json as a Tokenizer (byte-level) or a SentencePieceBPE, with its
    beginning- and end-of-text tokens. Raises ValueError naming what it cannot read."""
    path = Path(folder) / "tokenizer.json"
    data = read_json(path)
    # A run's own.
    if "model" not in data:
        return Tokenizer.load(path)
    try:
        model = data["model"]
        settings = {key: value for key, value in model.items() if key not in ("vocab", "merges")}
        if any((settings.get(key) or None) != value for key, value in PLAIN_BPE.items()):
            raise refuse(path, "model", settings)
        specials = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
        vocab = model["vocab"]
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        if model.get("byte_fallback"):
            tok = SentencePieceBPE(vocab, merges, specials, *sentencepiece_form(path, data))
        else:
            tok = byte_level(path, data, vocab, merges, specials)
        tok.bos_id, tok.add_bos, tok.eos_id = special_ids(Path(folder), data, specials)
    except (KeyError, TypeError, AttributeError, IndexError, regex.error) as e:
        raise ValueError(f"{path} (or its tokenizer_config.json) is corrupt: {e!r:.80}") from None
    return tok


def byte_level(path, data, vocab, merges, specials):
    """A byte-level tokenizer.json's Tokenizer: its split patterns, and NFC if asked."""
    normalizer = data.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}):
        raise refuse(path, "normalizer", normalizer)
    if [step.get("type") for step in steps(data.get("decoder"))] != ["ByteLevel"]:
        raise refuse(path, "decoder", data.get("decoder"))
    patterns = split_patterns(path, data.get("pre_tokenizer"))
    token_bytes = {id: piece_to_bytes(p) for p, id in vocab.items() if p not in specials}
    pairs = [(vocab[a], vocab[b]) for a, b in merges]
    # One pattern is a str, as ours: the same tokenizer gets the same fingerprint.
    pattern = patterns[0] if len(patterns) == 1 else patterns
    tok = Tokenizer(pairs, specials, pattern, token_bytes)
    tok.nfc = normalizer is not None
    tok.ignore_merges = data["model"].get("ignore_merges", False)
    return tok


def split_patterns(path, pre_tokenizer):
    """The regexes of a byte-level pre-tokenizer: its Split and Digits steps, then
    ByteLevel's own (GPT-2's pattern) unless use_regex is false."""
    found = steps(pre_tokenizer)
    patterns = []
    for step in found:
        kind = step.get("type")
        pattern = step.get("pattern") or {}
        isolated = step.get("behavior") == "Isolated" and not step.get("invert")
        if kind == "Split" and isolated and pattern.keys() in ({"Regex"}, {"String"}):
            patterns.append(pattern.get("Regex") or regex.escape(pattern["String"]))
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel" and step is found[-1] and not step.get("add_prefix_space"):
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        else:
            raise refuse(path, "pre-tokenizer", step)
    if not found or found[-1].get("type") != "ByteLevel":
        raise refuse(path, "pre-tokenizer", pre_tokenizer)
    return patterns


REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
GEMMA_SPLIT = {
    "type": "Split",
    "pattern": {"String": " "},
    "behavior": "MergedWithPrevious",
    "invert": False,
}


def sentencepiece_form(path, data):
    """(prefix, split) of a SentencePiece tokenizer.json: Llama 2's Prepend + Replace
    normalizer, transformers 5's Metaspace pre-tokenizer, or Gemma's Replace."""
    normalizer = steps(data.get("normalizer"))
    pre = steps(data.get("pre_tokenizer"))
    metaspace = pre[0] if len(pre) == 1 and pre[0].get("type") == "Metaspace" else {}
    form = None
    if normalizer == [{"type": "Prepend", "prepend": SPACE}, REPLACE_SPACE] and not pre:
        form = ("always", False)
    elif normalizer == [REPLACE_SPACE] and pre in ([], [GEMMA_SPLIT]):
        form = (None, False)
    elif not normalizer and metaspace.get("replacement") == SPACE:
        prefix = "first"
        if metaspace.get("prepend_scheme") == "never":
            prefix = None
        form = (prefix, metaspace.get("split", True))
    if form is None:
        raise refuse(path, "normalizer and pre-tokenizer", [normalizer, pre])
    decoder = [step.get("type") for step in steps(data.get("decoder"))]
    strips = "Strip" in decoder or "Metaspace" in decoder
    if "ByteFallback" not in decoder or strips != bool(form[0]):
        raise refuse(path, "decoder", data.get("decoder"))
    return form


def special_ids(folder, data, specials):
    """(bos_id, add_bos, eos_id): the token a text starts with, whether a prompt gets it (the
    template's, else add_bos_token), and the token that ends a text, by name or by id."""
    names = read_json(folder / "tokenizer_config.json", missing={})
    ids = read_json(folder / "config.json", missing={})
    post = steps(data.get("post_processor"))
    templates = [step for step in post if step.get("type") == "TemplateProcessing"]
    bos = None
    add_bos = bool(names.get("add_bos_token"))
    if templates:
        bos = templates[0]["single"][0].get("SpecialToken", {}).get("id")
        add_bos = bos is not None
    bos_id = specials.get(bos or token_name(names.get("bos_token")), ids.get("bos_token_id"))
    eos_id = specials.get(token_name(names.get("eos_token")), ids.get("eos_token_id"))
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    return bos_id, add_bos, eos_id


def token_name(token):
    """A special token as tokenizer_config.json names it: a string, or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def write_tokenizer_json(tok, folder):
    """Write a byte-level Tokenizer as tokenizer.json (a ByteLevel pre-tokenizer and decoder,
    a template that puts the beginning-of-text token first if we do) and as
    tokenizer_config.json, which names the special tokens."""
    patterns = [tok.pattern] if isinstance(tok.pattern, str) else tok.pattern
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": patterns == [GPT2_PATTERN],
    }
    split = {"type": "Split", "behavior": "Isolated", "invert": False}
    splits = [{**split, "pattern": {"Regex": p}} for p in patterns if not byte_level["use_regex"]]
    bos = tok.piece(tok.bos_id)
    template = [
        {"SpecialToken": {"id": bos, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ]
    post_processor = {
        "type": "TemplateProcessing",
        "single": template,
        "pair": template,
        "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
    }
    flags = dict.fromkeys(["single_word", "lstrip", "rstrip", "normalized"], False)
    added = [{"id": id, "content": name, "special": True, **flags}
             for name, id in tok.special_tokens.items()]
    model = {
        **PLAIN_BPE,
        "unk_token": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": tok.to_dict()["token2id"],
        "merges": [[tok._stand_in(a), tok._stand_in(b)] for a, b in tok.merges],
    }
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]},
        "post_processor": post_processor if tok.add_bos else None,
        "decoder": byte_level,
        "model": model,
    }
    write_json(Path(folder) / "tokenizer.json", data)
    # split_special_tokens: in transformers too, the text "<|endoftext|>" is text.
    names = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "split_special_tokens": True,
        "bos_token": bos,
        "eos_token": tok.piece(tok.eos_id),
    }
    write_json(Path(folder) / "tokenizer_config.json", names)
# -----------------------------------------------------------------------------
# 5. The corpus


def default_data_dir():
    """Where commands look for the corpus unless given --data."""
    return os.environ.get("CORPUS_DIR", "data/corpus")


def read_text(path):
    """One UTF-8 text file, without the byte order mark that Notepad writes, CRLF made LF.
    Raises FileNotFoundError, or ValueError if it is not UTF-8 or is empty."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); "
                         f"convert it to UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text.replace("\r\n", "\n")


def download_corpus(folder):
    """Download the corpus into `folder` with data/download.py."""
    script = Path(__file__).parent / "data" / "download.py"
    spec = importlib.util.spec_from_file_location("download", script)
    download = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(download)
    try:
        download.download_corpus(Path(folder))
    except download.DownloadError as e:
        raise OSError(f"could not download the corpus ({e}); to use a local copy, "
                      f"pass --data DIR (or set CORPUS_DIR=DIR)") from None


def read_corpus(data):
    """[(file name, text)] of the corpus: one UTF-8 file, or each .txt of a folder by name,
    without repeats (one novel is in the corpus twice). The default folder is downloaded."""
    data = Path(data)
    if data == Path(default_data_dir()) and not data.exists():
        download_corpus(data)
    if data.is_dir():
        paths = sorted(path for path in data.iterdir() if path.suffix.lower() == ".txt")
    else:
        paths = [data] if data.exists() else []
    if not paths:
        raise FileNotFoundError(f"no corpus at {data} (no .txt file): download it with "
                                f"`python data/download.py`, or pass --data DIR or FILE "
                                f"(or set CORPUS_DIR) to point at a local copy")
    first_name = {}
    for path in paths:
        first_name.setdefault(read_text(path), path.name)
    return [(name, text) for text, name in first_name.items()]


def split_corpus(docs):
    """(train docs, validation docs). Novels split whole, so that validation text is unseen:
    ordered by the SHA-256 of their names, the first 5% (at least one) validate, so that a
    new novel moves no other across the split. One text splits by position (split_text)."""
    if len(docs) == 1:
        train, val = split_text(*docs[0])
        return [train], [val]
    ranked = sorted(docs, key=lambda doc: sha256(doc[0]))
    n_val = max(1, round(len(docs) * 0.05))
    return ranked[n_val:], ranked[:n_val]


def split_text(name, text):
    """Split one text as nanoGPT splits its Shakespeare, the last 10% validating: at a line
    start in the 2% before the 90% mark, else at a sentence end or a space there, else at the
    mark. Raises ValueError if a part would be blank."""
    at = len(text) * 9 // 10
    start = at - len(text) // 50
    cut = at
    for boundary in (r"\n", r"[.!?…] ", r"\s"):
        ends = [match.end() for match in regex.finditer(boundary, text, pos=start, endpos=at)]
        if ends:
            cut = ends[-1]
            break
    train, val = text[:cut], text[cut:]
    if not (train.strip() and val.strip()):
        raise ValueError(f"{name} is too short to split into training and validation text")
    line = text.count("\n", 0, cut) + 1
    return (name, train), (f"{name} from line {line}", val)


def prepare_corpus(data, out_dir, vocab_size=None, log=print, resume=False):
    """Make, once, what a model file needs in out_dir: tokenizer.json (run_tokenizer) and
    {train,val}.bin, each split's ids as little-endian uint16, <|endoftext|> before each
    document. Returns (tokenizer, train path, val path)."""
    docs = read_corpus(data)
    train_docs, val_docs = split_corpus(docs)
    val_names = ", ".join(name for name, _ in val_docs)
    log(f"read {len(docs)} texts from {data}; validation split: {val_names}")
    tok = run_tokenizer([text for _, text in train_docs], out_dir, vocab_size, log, resume)
    train_path = encode_corpus(tok, train_docs, Path(out_dir, "train.bin"), log)
    val_path = encode_corpus(tok, val_docs, Path(out_dir, "val.bin"), log)
    return tok, train_path, val_path


def run_tokenizer(texts, out_dir, vocab_size, log, resume):
    """out_dir's tokenizer.json if vocab_size is None (a released model's) or if
    tokenizer.source.json says it was trained on `texts` for vocab_size; else a new one,
    unless resuming: the run's checkpoint needs the old one."""
    tok_path = Path(out_dir, "tokenizer.json")
    source_path = Path(out_dir, "tokenizer.source.json")
    if vocab_size is None:
        return Tokenizer.load(tok_path)
    source = {"text_sha256": sha256(json.dumps(texts)), "vocab_size": vocab_size}
    if tok_path.exists():
        tok = Tokenizer.load(tok_path)
        made = json.loads(source_path.read_text("utf-8")) if source_path.exists() else {}
        if made == {**source, "tokenizer": tok.fingerprint}:
            return tok
        # A run older than the record, or a fine-tuning's: its checkpoint vouches for it.
        if resume and not made:
            return tok
        if resume:
            asked = made.get("vocab_size", "?")
            raise ValueError(f"{tok_path} ({tok.vocab_size} tokens for --vocab-size {asked}) was "
                             f"not made from this --data for --vocab-size {vocab_size}")
        log(f"{tok_path} was made for other data or another --vocab-size: training anew")
    log(f"training a {vocab_size}-token BPE on {len(texts)} text(s)")
    tok = Tokenizer.train(texts, vocab_size, log)
    tok.save(tok_path)
    made = {**source, "tokenizer": tok.fingerprint}
    write_atomically(source_path, json.dumps(made).encode("utf-8"))
    return tok


def encode_corpus(tok, docs, path, log=print):
    """Write the docs' ids to `path`, unless the `.json` beside it says it holds them."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    identity = {
        "tokenizer": tok.fingerprint,
        "documents": [name for name, _ in docs],
        "text_sha256": sha256("".join(text for _, text in docs)),
    }
    if path.exists() and meta_path.exists():
        # Its size too: a truncated array is made again.
        made = {**identity, "bytes": path.stat().st_size}
        try:
            recorded = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError:  # a damaged record vouches for nothing
            recorded = None
        if recorded == made:
            return path
    # Until the new record is written, no record may vouch for the new array.
    meta_path.unlink(missing_ok=True)
    start = time.time()
    ids = array("H")
    texts = [text for _, text in docs]
    for doc_ids in parallel_map(lambda text: array("H", tok.encode(text)).tobytes(), texts):
        ids.append(tok.eot_id)
        ids.frombytes(doc_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    write_atomically(path, ids.tobytes())
    write_json(meta_path, {**identity, "bytes": 2 * len(ids)})
    seconds = time.time() - start
    log(f"encoded {len(docs)} documents into {path}: "
        f"{len(ids):,} tokens in {seconds:.1f}s")
    return path


# Below this many characters, starting workers costs more than it saves.
PARALLEL_MIN_CHARS = 1_000_000
# The function that parallel_map's forked workers call.
_job = None


def parallel_map(fn, texts):
    """Yield fn(text) for each text of a list, in order; a large input in a forked worker
    per core, which inherits `fn` (so a closure will do)."""
    global _job
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count()
    # Windows cannot fork: it works here, in one process.
    workers = 1
    if "fork" in multiprocessing.get_all_start_methods():
        workers = min(len(texts), cores)
    if workers < 2 or sum(map(len, texts)) < PARALLEL_MIN_CHARS:
        yield from map(fn, texts)
        return
    _job = fn
    # Workers ignore Ctrl-C: it is the parent's to handle.
    ignore_ctrl_c = (signal.SIGINT, signal.SIG_IGN)
    with multiprocessing.get_context("fork").Pool(workers, signal.signal, ignore_ctrl_c) as pool:
        yield from pool.imap(_call_job, texts)


def _call_job(text):
    return _job(text)


# -----------------------------------------------------------------------------
# 6. Command line

DEFAULT_TOKENIZER = "checkpoints/gpt2/tokenizer.json"


def cmd_train(args):
    # A run's tokenizer.json stays: its checkpoint was trained with it.
    if (Path(args.out).parent / "ckpt.pt").exists():
        raise ValueError(f"{args.out} is a run's tokenizer: give another --out")
    start = time.time()
    train_docs, val_docs = split_corpus(read_corpus(args.data))
    texts = [text for _, text in train_docs]
    val_text = "".join(text for _, text in val_docs)
    print(f"training a {args.vocab_size}-token BPE on {len(texts)} novels, "
          f"{sum(map(len, texts)):,} characters")
    tok = Tokenizer.train(texts, args.vocab_size, log=print)
    tok.save(args.out)
    chars_per_token = len(val_text) / max(1, len(tok.encode(val_text)))
    print(f"done in {time.time() - start:.1f}s: vocabulary {tok.vocab_size}, "
          f"{chars_per_token:.2f} characters per token on the validation novels, "
          f"saved to {args.out}")


def open_tokenizer(path):
    """--tokenizer: a tokenizer.json that bpe.py wrote, or a Hugging Face folder."""
    if Path(path).is_dir():
        return Tokenizer.from_pretrained(path)
    return Tokenizer.load(path)


def cmd_encode(args):
    tok = open_tokenizer(args.tokenizer)
    if args.file:
        text = read_text(args.file)
    elif args.text == "-":
        text = sys.stdin.buffer.read().decode("utf-8")
    else:
        text = args.text
    ids = tok.encode(text)
    print(" ".join(map(str, ids)))
    for id in ids:
        print(f"{id:>6}  '{tok.piece(id)}'")


def cmd_decode(args):
    print(open_tokenizer(args.tokenizer).decode(args.ids))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported like every other bad input: one line, exit 1."""

    def error(self, message):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = ArgumentParser(description="Byte-level BPE tokenizer.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    # allow_abbrev=False: a mistyped flag is an error, never another flag.
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter, "allow_abbrev": False}
    train = commands.add_parser("train", help="learn a vocabulary from the corpus", **defaults)
    train.add_argument("--vocab-size", type=int, default=3000,
                       help="bytes + merges + <|endoftext|>")
    train.add_argument("--data", default=default_data_dir(),
                       help="a folder of .txt files or one (env CORPUS_DIR)")
    train.add_argument("--out", default=DEFAULT_TOKENIZER, help="where to write tokenizer.json")
    encode = commands.add_parser("encode", help="text -> ids", **defaults)
    source = encode.add_mutually_exclusive_group()
    source.add_argument("text", nargs="?", default="-", help="text to encode; left out or -: stdin")
    source.add_argument("--file", help="read the text from this UTF-8 file")
    decode = commands.add_parser("decode", help="ids -> text", **defaults)
    decode.add_argument("ids", type=int, nargs="+")
    for command in (encode, decode):
        command.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                             help="a tokenizer.json of bpe.py's, or a Hugging Face folder")
    train.set_defaults(run=cmd_train)
    encode.set_defaults(run=cmd_encode)
    decode.set_defaults(run=cmd_decode)
    args = parser.parse_args(argv)
    # UTF-8 whatever the console's code page, as in Python's UTF-8 mode.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace")
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


if __name__ == "__main__":
    # A closed pipe (`| head`) ends the program quietly, as it ends other Unix tools.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
