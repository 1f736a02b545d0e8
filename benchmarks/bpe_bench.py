"""
Benchmark bpe.py against Hugging Face `tokenizers` (optional: pip install tokenizers).

    python benchmarks/bpe_bench.py --data DIR [--vocab-size 3000]

On the training novels of the corpus in DIR, side by side in one run:
  - training time and peak memory (each trainer in a fresh child process),
  - encoding throughput of the whole corpus, MB of UTF-8 per second, with the
    same vocabulary in both (ours loaded into `tokenizers`), cold caches,
  - characters per token on the validation novels, each with its own vocabulary,
  - whether the two encoders give identical ids with the same vocabulary,
  - the released kinds of tokenizer.json, byte-level (ours, exported) and SentencePiece's
    (trained with `sentencepiece` on the training novels' lines, Llama 2's form), read by
    bpe.py and by `tokenizers`: single-threaded encoding time of the validation novels and
    of a 200,000-letter line without a space, and whether the ids are identical.
"""

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from array import array
from pathlib import Path

import regex

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bpe  # noqa: E402

try:
    import tokenizers
except ImportError:
    tokenizers = None


def in_child(fn, *args):
    """Run fn(*args) in a fresh process (spawned, not forked: `tokenizers`
    turns its threads off in a forked child): (result, seconds, peak MB)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=measure, args=(child, fn, args))
    process.start()
    result = parent.recv()
    process.join()
    return result


def measure(connection, fn, args):
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    peak_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    connection.send((result, seconds, peak_kb / 1024))


# -- ours ---------------------------------------------------------------------


def ours_train(texts, vocab_size):
    return bpe.Tokenizer.train(texts, vocab_size).to_dict()


def ours_encode(tok_dict, texts):
    tok = bpe.Tokenizer(tok_dict["merges"])  # a fresh tokenizer: cold cache

    def as_uint16(text):  # what bpe.encode_corpus does with each document
        return array("H", tok.encode(text)).tobytes()

    return sum(len(ids) for ids in bpe.parallel_map(as_uint16, texts)) // 2


# -- Hugging Face tokenizers ------------------------------------------------------


def lines_of(texts):
    """The texts cut into lines, its fastest input, but only after a line that
    ends in a letter or mark and before one that starts with one, where GPT-2's
    pattern always cuts anyway: both tokenizers then see the same chunks."""
    return [line for text in texts for line in regex.split(r"(?<=\S\n)(?=\S)", text)]


def hf_train(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bpe.EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines_of(texts), trainer)
    return tok.to_str()


def hf_from_ours(tok_dict):
    """Our vocabulary and merges as a `tokenizers` BPE: same ids by design."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = tok_dict["token2id"]
    pieces = tok_dict["id2token"]
    merges = [(pieces[str(a)], pieces[str(b)]) for a, b in tok_dict["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def hf_encode(tok_dict, texts):
    tok = hf_from_ours(tok_dict)
    return sum(len(e.ids) for e in tok.encode_batch(lines_of(texts)))


def released_kinds(ours_dict, train, val):
    """bpe.py and `tokenizers` reading the same tokenizer.json, each kind, side by side
    (`tokenizers` encodes one text on one thread)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import families  # noqa: E402  (the tests' builders of each family's form)

    lines = [line for text in train[:20] for line in text.splitlines() if line.strip()]
    folders = {kind: Path(tempfile.mkdtemp()) for kind in ("byte-level", "SentencePiece")}
    bpe.Tokenizer(ours_dict["merges"]).save_pretrained(folders["byte-level"])
    families.sentencepiece("llama2", lines, 3000).save(str(folders["SentencePiece"] / "tokenizer.json"))
    letters = "".join(regex.findall(r"\p{L}", "".join(val)))[:200_000]
    texts = {"validation novels": "\n".join(val), "200,000 letters, no space": letters}
    print("\n| tokenizer.json | text | bpe.py (s) | tokenizers (s) | ratio | identical ids |")
    print("|---|---|---|---|---|---|")
    for kind, folder in folders.items():
        for what, text in texts.items():
            ours = bpe.Tokenizer.from_pretrained(folder)  # cold cache
            start = time.perf_counter()
            ids = ours.encode(text)
            ours_s = time.perf_counter() - start
            theirs = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
            start = time.perf_counter()
            their_ids = theirs.encode(text, add_special_tokens=False).ids
            theirs_s = time.perf_counter() - start
            same = "yes" if ids == their_ids else "NO"
            print(f"| {kind} | {what} | {ours_s:.2f} | {theirs_s:.2f} | {ours_s / theirs_s:.1f}x | {same} |")


def chars_per_token(encode, texts):
    return sum(map(len, texts)) / sum(len(encode(text)) for text in texts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=bpe.default_data_dir())
    parser.add_argument("--vocab-size", type=int, default=3000)
    args = parser.parse_args()

    train_docs, val_docs = bpe.split_corpus(bpe.read_corpus(args.data))
    train, val = [t for _, t in train_docs], [t for _, t in val_docs]
    all_texts = train + val
    corpus_mb = sum(len(t.encode("utf-8")) for t in all_texts) / 1e6
    print(f"corpus: {len(train)} training + {len(val)} validation novels, "
          f"{sum(map(len, train)) / 1e6:.1f}M training characters, {corpus_mb:.1f} MB in all; "
          f"{os.cpu_count()} cores; vocab {args.vocab_size}\n")

    rows = []
    ours_dict, ours_s, ours_mb = in_child(ours_train, train, args.vocab_size)
    ours = bpe.Tokenizer(ours_dict["merges"])
    _, enc_s, _ = in_child(ours_encode, ours_dict, all_texts)
    rows.append(("bpe.py", ours_s, ours_mb, corpus_mb / enc_s, chars_per_token(ours.encode, val)))

    if tokenizers is None:
        print("(install `tokenizers` to compare with Hugging Face)")
    else:
        hf_json, hf_s, hf_mb = in_child(hf_train, train, args.vocab_size)
        hf_trained = tokenizers.Tokenizer.from_str(hf_json)
        _, hf_enc_s, _ = in_child(hf_encode, ours_dict, all_texts)
        rows.append((f"HF tokenizers {tokenizers.__version__}", hf_s, hf_mb, corpus_mb / hf_enc_s,
                     chars_per_token(lambda t: hf_trained.encode(t).ids, val)))

    print(f"| {'tokenizer':<24} | train (s) | train peak (MB) | encode corpus (MB/s) | val chars/token |")
    print(f"|{'-' * 26}|-----------|-----------------|----------------------|-----------------|")
    for name, train_s, peak, mb_s, cpt in rows:
        print(f"| {name:<24} | {train_s:9.1f} | {peak:15.0f} | {mb_s:20.2f} | {cpt:15.3f} |")
    if len(rows) == 2:
        (_, s0, _, e0, c0), (_, s1, _, e1, c1) = rows
        print(f"\nours / HF: training time {s0 / s1:.2f}x, encoding throughput {e0 / e1:.2f}x, "
              f"chars per token {c0 / c1:.4f}x")
        hf_same_vocab = hf_from_ours(ours_dict)
        sample = "\n".join(val)[:2_000_000]
        same = ours.encode(sample) == hf_same_vocab.encode(sample).ids
        print(f"same vocabulary, first 2M validation characters: identical ids: {'yes' if same else 'NO'}")
        released_kinds(ours_dict, train, val)


if __name__ == "__main__":
    main()
