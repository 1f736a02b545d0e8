"""
Byte-level BPE: the tokenizer every model file of this project shares.

Byte Pair Encoding (Sennrich et al., 2016; byte-level as in GPT-2, Radford et al.,
2019) starts from the 256 possible bytes and learns, one merge at a time, to fuse
the most frequent pair of adjacent tokens into a new token. A text is then encoded
by applying the learned merges, in the order they were learned.

Reading order:
  1. Pre-tokenization: a regex splits text into chunks; merges never cross them.
  2. The textbook trainer: count pairs, merge the most frequent, repeat.
  3. The fast trainer: the same merges, without recounting the world each time.
  4. The Tokenizer: encode, decode, save, load.
  5. The corpus: reading the novels, the train/validation split, token arrays.
  6. The command line:
       python bpe.py train --vocab-size 3000 --data DIR --out PATH
       python bpe.py encode --tokenizer PATH "Привет, мир!"
       python bpe.py decode --tokenizer PATH 1017 44 612
"""

import argparse
import codecs
import hashlib
import heapq
import json
import multiprocessing
import os
import sys
import time
from array import array
from collections import Counter, defaultdict
from functools import cached_property
from itertools import chain, repeat
from operator import add
from pathlib import Path

import regex

# -----------------------------------------------------------------------------
# 1. Pre-tokenization

# GPT-2's pattern: English contractions, runs of letters (any script, Cyrillic
# included), runs of digits, runs of other symbols, each optionally led by one
# space; then whitespace. `\s+(?!\S)` leaves the last space of a run to the next
# word, so " word" stays one chunk. The standard `re` has no \p{L} / \p{N}.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

EOT = "<|endoftext|>"  # separates documents; never produced from ordinary text
MAX_VOCAB_SIZE = 2**16  # token arrays on disk hold 2 bytes per token
NO_RANK = MAX_VOCAB_SIZE  # ranks are smaller: a pair that was never merged


def count_chunks(texts, pattern=GPT2_PATTERN):
    """How often each pre-tokenized chunk occurs in the texts. BPE only ever
    looks inside chunks, so identical chunks are trained (and encoded) once."""
    compiled = regex.compile(pattern)
    counts = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return counts


# -----------------------------------------------------------------------------
# 2. The textbook trainer
#
# A chunk is a tuple of token ids, starting as its UTF-8 bytes. Each round counts
# every adjacent pair (weighted by how often the chunk occurs), picks the most
# frequent, and replaces it everywhere, left to right, by a new id 256, 257, ...
#
# Tie rule, used by both trainers: among equally frequent pairs, the smallest
# pair (a, b) wins, comparing a first, then b. This is deterministic and does not
# depend on the order the text was read in.


def get_pair_counts(chunks):
    """{(a, b): how often a is directly followed by b}, over {chunk: count}."""
    pair_counts = Counter()
    for ids, count in chunks.items():
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += count
    return pair_counts


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


def train_reference(chunk_counts, n_merges):
    """The merges, learned the slow and obvious way: O(merges x text)."""
    chunks = {tuple(chunk.encode("utf-8")): n for chunk, n in chunk_counts.items()}
    merges = []
    while len(merges) < n_merges:
        pair_counts = get_pair_counts(chunks)
        if not pair_counts:
            break  # every chunk is a single token: nothing left to merge
        pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        new_id = 256 + len(merges)
        merged = Counter()
        for ids, count in chunks.items():
            merged[merge(ids, pair, new_id)] += count
        chunks = merged
        merges.append(pair)
    return merges


# -----------------------------------------------------------------------------
# 3. The fast trainer
#
# The same merges, with three changes that make it fast:
# - A chunk is a `str` whose k-th character is the id chr(id) of its k-th token.
#   Its UTF-8 bytes decode as latin-1 to characters 0..255, i.e. to the byte ids,
#   and merging pair "ab" into id n is `chunk.replace("ab", chr(n))`: left to
#   right, like `merge` above, but in C. A pair is the 2-character string "ab",
#   and comparing such strings compares (a, b), so the tie rule carries over.
# - Pair counts are kept up to date instead of recounted: a merge changes only
#   the pairs next to each occurrence, and only in the chunks that contain it,
#   which an index {pair: chunk numbers} finds.
# - The most frequent pair comes from a heap of (-count, pair). Counts only fall,
#   except for the pairs a merge creates (pushed when created), so a popped entry
#   whose count has since fallen is pushed back with its count and the next one
#   tried; the first popped entry that is still exact is the true maximum.


def train_fast(chunk_counts, n_merges, log=None):
    """The merges `train_reference` would learn, in a fraction of the time."""
    chunks = [chunk.encode("utf-8").decode("latin-1") for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    pair_counts, where = defaultdict(int), defaultdict(set)
    for i, chunk in enumerate(chunks):
        for k in range(len(chunk) - 1):
            pair = chunk[k : k + 2]
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    merges, progress = [], Progress(n_merges, "merges", log)
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
        progress.step()
    return merges


def merge_everywhere(pair, new, chunks, counts, pair_counts, where):
    """Merge `pair` into token `new` in every chunk that contains it, updating
    the pair counts and the index in place. Returns {created pair: count}.

    Around each occurrence, "x a b y" becomes "x n y": the pairs (x, a), (a, b)
    and (b, y) lose the chunk's count and (x, n), (n, y) gain it. When two
    occurrences touch ("a b a b" -> "n n"), the pair between them was (b, a)
    and becomes (n, n), counted once, from the right-hand occurrence."""
    a, b = pair
    created = defaultdict(int)  # counts of the new pairs, which all contain `new`
    for i in where.pop(pair):
        chunk = chunks[i]
        if pair not in chunk:
            continue  # the index is lazy: an earlier merge took this occurrence
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


class Progress:
    """Prints `done/total`, rate and ETA now and then, if given a `log`."""

    def __init__(self, total, unit, log, every=2.0):
        self.total, self.unit, self.log, self.every = total, unit, log, every
        self.done, self.start = 0, time.time()
        self.last = self.start

    def step(self):
        self.done += 1
        now = time.time()
        if self.log and (now - self.last > self.every or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate
            self.log(f"{self.done}/{self.total} {self.unit}, {rate:.0f}/s, ETA {eta:.0f}s")


# -----------------------------------------------------------------------------
# 4. The Tokenizer


def bytes_to_unicode():
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand
    for themselves, the others (controls, space) get characters from 256 on.
    Used to write tokens as readable, reversible strings in tokenizer.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_ins[b] = chr(b)
        else:
            stand_ins[b] = chr(256 + extra)
            extra += 1
    return stand_ins


BYTE_STAND_INS = bytes_to_unicode()
STAND_IN_BYTES = {c: b for b, c in BYTE_STAND_INS.items()}


def piece_to_bytes(piece):
    """Inverse of the stand-ins: a token string from a vocabulary file -> bytes."""
    try:
        return bytes(STAND_IN_BYTES[c] for c in piece)
    except KeyError as e:
        raise ValueError(f"token {piece!r} has a character ({e.args[0]!r}) that stands for no byte") from None


class Tokenizer:
    """A byte-level BPE tokenizer: a vocabulary of byte strings (each of the 256
    bytes, one token per merge), the merges in the order they were learned, and
    special tokens (here <|endoftext|>) that stand outside the merges.

    Tokenizers trained here number the bytes 0..255, merge i 256 + i and the
    special tokens last; GPT-2's files number the bytes otherwise. So the byte
    and merge ids are looked up in `vocab` ({id: bytes}), never computed."""

    def __init__(self, merges, special_tokens=None, pattern=GPT2_PATTERN, vocab=None):
        self.merges = [tuple(pair) for pair in merges]
        self.vocab = vocab or numbered_vocab(self.merges)
        self.special_tokens = {EOT: len(self.vocab)} if special_tokens is None else special_tokens
        self.pattern = pattern
        self._compiled = regex.compile(pattern)
        tokens = {**self.vocab, **{id: name.encode("utf-8") for name, id in self.special_tokens.items()}}
        if sorted(tokens) != list(range(len(self.vocab) + len(self.special_tokens))):
            raise ValueError("token ids must be 0, 1, 2, ... with no gap and no id given twice")
        self._bytes = [tokens[id] for id in range(len(tokens))]  # id -> the bytes it stands for
        # Encoding works on strings of chr(id), as the fast trainer does: each
        # byte's id, each merge as "ab" (its two ids) -> rank and the merged id.
        id_of = {token: id for id, token in self.vocab.items()}
        try:
            self._byte_ids = {b: chr(id_of[bytes([b])]) for b in range(256)}
            self._merged = [chr(id_of[self.vocab[a] + self.vocab[b]]) for a, b in self.merges]
        except KeyError as e:
            raise ValueError(f"the vocabulary lacks the byte or merged token {e.args[0]!r}") from None
        self._pairs = [chr(a) + chr(b) for a, b in self.merges]
        self._ranks = {pair: rank for rank, pair in enumerate(self._pairs)}
        self._cache = {}

    @classmethod
    def train(cls, texts, vocab_size, log=None):
        """Learn vocab_size - 256 - 1 merges from `texts` (an iterable of str)."""
        n_merges = vocab_size - 256 - 1
        if not 257 <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be between 257 and {MAX_VOCAB_SIZE}, got {vocab_size}")
        chunk_counts = parallel_count_chunks(list(texts))
        merges = train_fast(chunk_counts, n_merges, log)
        if log and len(merges) < n_merges:
            log(f"the text has only {len(merges)} distinct merges; vocabulary is {257 + len(merges)}")
        return cls(merges)

    @classmethod
    def from_pretrained(cls, folder):
        """GPT-2's tokenizer files, vocab.json ({token: id}) and merges.txt (one
        merge "a b" per line, in rank order), as Hugging Face publishes them.
        A token that is neither a byte nor made by a merge is special."""
        folder = Path(folder)
        try:
            token2id = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{folder} lacks {Path(e.filename).name}: a GPT-2 tokenizer is vocab.json + merges.txt") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder}/vocab.json is not a GPT-2 vocabulary ({e})") from None
        pairs = [line.split(" ") for line in lines if line and not line.startswith("#version")]
        if not isinstance(token2id, dict) or any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{folder} holds no GPT-2 tokenizer: vocab.json must map tokens to ids, "
                             f"each line of merges.txt be two tokens")
        try:
            merges = [(token2id[a], token2id[b]) for a, b in pairs]
        except KeyError as e:
            raise ValueError(f"{folder}/merges.txt names {e.args[0]!r}, which vocab.json lacks") from None
        made = set(BYTE_STAND_INS.values()) | {a + b for a, b in pairs}
        vocab = {id: piece_to_bytes(piece) for piece, id in token2id.items() if piece in made}
        special = {piece: id for piece, id in token2id.items() if piece not in made}
        return cls(merges, special, GPT2_PATTERN, vocab)

    def save_pretrained(self, folder):
        """Write vocab.json and merges.txt, the files `from_pretrained` reads."""
        folder = Path(folder)
        token2id = self.to_dict()["token2id"]
        write_atomically(folder / "vocab.json", json.dumps(token2id, ensure_ascii=False).encode("utf-8"))
        merges = [f"{self._stand_in(a)} {self._stand_in(b)}" for a, b in self.merges]
        write_atomically(folder / "merges.txt", "\n".join(["#version: 0.2", *merges, ""]).encode("utf-8"))

    @property
    def vocab_size(self):
        return len(self._bytes)

    @property
    def eot_id(self):
        return self.special_tokens[EOT]

    # -- encoding --------------------------------------------------------------

    def encode(self, text):
        """Text -> ids. Special-token names in the text are encoded as text."""
        chunks = self._compiled.findall(text)
        for chunk in set(chunks).difference(self._cache):
            self._cache[chunk] = self._encode_chunk(chunk)
        return list(chain.from_iterable(map(self._cache.__getitem__, chunks)))

    def _encode_chunk(self, chunk):
        """Apply the merges to one chunk: again and again, merge (everywhere in
        the chunk) the pair that was learned earliest, until none is left."""
        symbols = chunk.encode("utf-8").decode("latin-1").translate(self._byte_ids)
        while len(symbols) > 1:
            pairs = map(add, symbols, symbols[1:])  # "ab", "bc", ...
            rank = min(map(self._ranks.get, pairs, repeat(NO_RANK)))
            if rank == NO_RANK:
                break
            symbols = symbols.replace(self._pairs[rank], self._merged[rank])
        return [ord(s) for s in symbols]

    # -- decoding --------------------------------------------------------------

    def decode_bytes(self, ids):
        """Ids -> the raw bytes they stand for (possibly cut inside a character)."""
        for id in ids:
            if not 0 <= id < self.vocab_size:
                raise ValueError(f"token id {id} is out of range for a vocabulary of {self.vocab_size}")
        return b"".join([self._bytes[id] for id in ids])

    def decode(self, ids):
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_stream(self, ids):
        """Yield the text of ids as they come (from a model generating them). A
        token can end in the middle of a multi-byte character (half of a Cyrillic
        letter): an incremental decoder holds such bytes back until it is whole."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for id in ids:
            text = decoder.decode(self.decode_bytes([id]))
            if text:
                yield text
        text = decoder.decode(b"", final=True)
        if text:
            yield text

    def piece(self, id):
        """A token as a one-line readable string: its text, with \\xd0 for a
        byte that is only part of a character and \\n for a control character."""
        text = self._bytes[id].decode("utf-8", errors="backslashreplace")
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)

    def char_counts(self):
        """For each id, how many characters it adds to decoded text: the bytes
        that start a UTF-8 character (not 0b10xxxxxx). Special tokens add 0.
        Summed over a token sequence, it counts the characters of its text, so
        that loss per character compares models with different tokenizers."""
        counts = [sum(1 for b in token if b & 0xC0 != 0x80) for token in self._bytes]
        for id in self.special_tokens.values():
            counts[id] = 0
        return counts

    # -- saving and loading ----------------------------------------------------

    def to_dict(self):
        return {
            "format": "bpe.py byte-level BPE",
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "merges": [list(pair) for pair in self.merges],
            "token2id": {self._stand_in(id): id for id in range(self.vocab_size)},
            "id2token": {str(id): self._stand_in(id) for id in range(self.vocab_size)},
        }

    def _stand_in(self, id):
        if id in self.vocab:
            return "".join(BYTE_STAND_INS[b] for b in self._bytes[id])
        return self._bytes[id].decode("utf-8")  # a special token, written as itself

    @cached_property  # a tokenizer never changes after it is made
    def fingerprint(self):
        """A hash of everything that decides the ids: checkpoints store it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()

    def save(self, path):
        """Write tokenizer.json (atomically: a temp file, then a rename)."""
        write_atomically(path, to_json_lines(self.to_dict()).encode("utf-8"))

    @classmethod
    def load(cls, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a valid tokenizer file (truncated or corrupt: {e})") from None
        if not isinstance(data, dict) or data.get("format") != "bpe.py byte-level BPE":
            raise ValueError(f"{path} is not a tokenizer written by bpe.py")
        try:
            specials = data["special_tokens"]
            vocab = {int(id): piece_to_bytes(piece) for id, piece in data["id2token"].items() if piece not in specials}
            tok = cls(data["merges"], specials, data["pattern"], vocab)
            ok = tok.to_dict() == data
        except (KeyError, TypeError, ValueError, IndexError, regex.error):
            ok = False
        if not ok:
            raise ValueError(f"{path} is corrupt: its merges, vocabulary and ids do not agree")
        return tok


def numbered_vocab(merges):
    """{id: bytes} as this project numbers it: bytes first, then the merges."""
    vocab = {b: bytes([b]) for b in range(256)}
    for a, b in merges:
        vocab[len(vocab)] = vocab[a] + vocab[b]
    return vocab


def to_json_lines(data):
    """JSON with one list item or dict entry per line: diffable and readable."""
    fields = []
    for key, value in data.items():
        if isinstance(value, list):
            items = [json.dumps(v, ensure_ascii=False) for v in value]
            text = "[\n  " + ",\n  ".join(items) + "\n ]"
        elif isinstance(value, dict) and len(value) > 1:
            items = [f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items()]
            text = "{\n  " + ",\n  ".join(items) + "\n }"
        else:
            text = json.dumps(value, ensure_ascii=False)
        fields.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def write_atomically(path, data):
    """Write bytes to `path` so that a crash leaves the old file or the new one,
    never half of one: write a temp file beside it, then rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# 5. The corpus
#
# The corpus is a folder of UTF-8 .txt files, one novel each (see data/). The
# split is by whole novel, so validation text is text the model never saw:
# novels are ordered by the SHA-256 of their file name, and the first 5% (at
# least one) are the validation set. The rule does not depend on the order files
# are listed in, and adding a novel moves no other novel across the split.

VAL_FRACTION = 0.05


def default_data_dir():
    """Where commands look for the corpus unless given --data."""
    return os.environ.get("CORPUS_DIR", "data/corpus")


def read_text(path):
    """One UTF-8 text file, with Windows line ends (CRLF) made LF."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text.replace("\r\n", "\n")


def read_corpus(data_dir):
    """[(file name, text)] for every .txt in data_dir, by name; a file whose
    text repeats an earlier one is read once (the corpus has a novel twice)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"no corpus at {data_dir}: download it with `python data/download.py`, "
            f"or pass --data DIR (or set CORPUS_DIR) to point at a local copy"
        )
    paths = sorted(data_dir.glob("*.txt"))
    if not paths:
        raise ValueError(f"{data_dir} has no .txt files")
    docs, seen = [], set()
    for path in paths:
        text = read_text(path)
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest not in seen:
            seen.add(digest)
            docs.append((path.name, text))
    return docs


def split_corpus(docs):
    """(train docs, validation docs), by the rule above."""
    if len(docs) < 2:
        raise ValueError("the corpus needs at least two documents: one is held out for validation")
    ranked = sorted(docs, key=lambda doc: hashlib.sha256(doc[0].encode("utf-8")).hexdigest())
    n_val = max(1, round(len(docs) * VAL_FRACTION))
    return ranked[n_val:], ranked[:n_val]


def prepare_corpus(data_dir, out_dir, vocab_size=None, log=print):
    """Everything a model file needs from the corpus, made once and cached:
    out_dir/tokenizer.json (trained on the training novels unless present) and
    out_dir/{train,val}.bin, the token ids of each split as little-endian uint16,
    with <|endoftext|> before every document. Returns (tokenizer, train, val)."""
    out_dir = Path(out_dir)
    train_docs, val_docs = split_corpus(read_corpus(data_dir))
    tok_path = out_dir / "tokenizer.json"
    if tok_path.exists():
        tok = Tokenizer.load(tok_path)
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise ValueError(
                f"{tok_path} has a vocabulary of {tok.vocab_size}, not {vocab_size}: "
                f"use another --out-dir, or leave --vocab-size out"
            )
    else:
        vocab_size = vocab_size or 3000
        log(f"training a {vocab_size}-token BPE on {len(train_docs)} novels")
        tok = Tokenizer.train([text for _, text in train_docs], vocab_size, log)
        tok.save(tok_path)
    paths = []
    for split, docs in (("train", train_docs), ("val", val_docs)):
        paths.append(encode_corpus(tok, docs, out_dir / f"{split}.bin", log))
    return tok, paths[0], paths[1]


def encode_corpus(tok, docs, path, log=print):
    """Write the docs' ids to `path`, unless it already holds exactly them (a
    small `.json` beside it records what the array was made from)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    identity = {
        "tokenizer": tok.fingerprint,
        "documents": [name for name, _ in docs],
        "text_sha256": hashlib.sha256("".join(text for _, text in docs).encode("utf-8")).hexdigest(),
    }
    if path.exists() and meta_path.exists() and json.loads(meta_path.read_text(encoding="utf-8")) == identity:
        return path
    start = time.time()
    ids = array("H")
    for doc_ids in parallel_encode(tok, [text for _, text in docs]):
        ids.append(tok.eot_id)
        ids.frombytes(doc_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    write_atomically(path, ids.tobytes())
    write_atomically(meta_path, json.dumps(identity, indent=1).encode("utf-8"))
    log(f"encoded {len(docs)} documents into {path}: {len(ids):,} tokens in {time.time() - start:.1f}s")
    return path


# Both trainer and encoder use every core for the part that splits cleanly: each
# worker pre-tokenizes (or encodes) whole documents. Small inputs stay in one
# process, where starting workers would cost more than it saves.

PARALLEL_MIN_CHARS = 1_000_000


def _worker_count(texts):
    if len(texts) < 2 or sum(map(len, texts)) < PARALLEL_MIN_CHARS:
        return 1
    return min(len(texts), os.cpu_count() or 1)


def parallel_count_chunks(texts):
    workers = _worker_count(texts)
    if workers == 1:
        return count_chunks(texts)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(count_chunks, [texts[w::workers] for w in range(workers)])
    total = parts[0]
    for part in parts[1:]:
        total.update(part)
    return total


_worker_tokenizer = None


def _encode_to_bytes(text):
    return array("H", _worker_tokenizer.encode(text)).tobytes()


def parallel_encode(tok, texts):
    """Yield each text's ids as native uint16 bytes, in order."""
    global _worker_tokenizer
    _worker_tokenizer = tok  # inherited by the forked workers
    workers = _worker_count(texts)
    if workers == 1:
        yield from map(_encode_to_bytes, texts)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_encode_to_bytes, texts)


# -----------------------------------------------------------------------------
# 6. Command line

DEFAULT_TOKENIZER = "checkpoints/gpt2/tokenizer.json"


def cmd_train(args):
    start = time.time()
    train_docs, val_docs = split_corpus(read_corpus(args.data))
    print(f"training a {args.vocab_size}-token BPE on {len(train_docs)} novels "
          f"({sum(len(t) for _, t in train_docs) / 1e6:.1f}M characters)")
    tok = Tokenizer.train([text for _, text in train_docs], args.vocab_size, log=print)
    tok.save(args.out)
    val_text = "".join(text for _, text in val_docs)
    chars_per_token = len(val_text) / max(1, len(tok.encode(val_text)))
    print(f"done in {time.time() - start:.1f}s: vocabulary {tok.vocab_size}, "
          f"{chars_per_token:.2f} characters per token on the validation novels, saved to {args.out}")


def cmd_encode(args):
    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(" ".join(map(str, ids)))
    for id in ids:
        print(f"{id:>6}  '{tok.piece(id)}'")


def cmd_decode(args):
    tok = Tokenizer.load(args.tokenizer)
    print(tok.decode(args.ids))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Byte-level BPE tokenizer.")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    train = commands.add_parser("train", help="learn a vocabulary from the corpus", formatter_class=defaults)
    train.add_argument("--vocab-size", type=int, default=3000, help="bytes + merges + <|endoftext|>")
    train.add_argument("--data", default=default_data_dir(), help="folder of .txt files (env CORPUS_DIR)")
    train.add_argument("--out", default=DEFAULT_TOKENIZER, help="where to write tokenizer.json")
    train.set_defaults(run=cmd_train)

    encode = commands.add_parser("encode", help="text -> ids", formatter_class=defaults)
    encode.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    encode.add_argument("text")
    encode.set_defaults(run=cmd_encode)

    decode = commands.add_parser("decode", help="ids -> text", formatter_class=defaults)
    decode.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    decode.add_argument("ids", type=int, nargs="+")
    decode.set_defaults(run=cmd_decode)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")


if __name__ == "__main__":
    main()
