"""
Classic compressors on the validation split, in bits per character: the compressors' rows of
the README's results table. A language model is a compressor, and its bits per character is
its compression rate, so these are the numbers a model has to beat.

    python benchmarks/compressors.py --data DIR    # the corpus: about a minute
    python benchmarks/compressors.py --quick       # a small PPMd model: a smoke test

The text is the validation novels' (bpe.split_corpus, as the model files split the corpus),
joined as the models see them: the <|endoftext|> between novels has no characters. Each
compressor gets its UTF-8 bytes; bits per character are compressed bits over its characters.
PPMd (variant I, from the optional pyppmd package) runs at order 10 on the text alone, and at
order 12 "primed": compress(train + validation) minus compress(train), what the validation
text costs once the training novels are known, as a trained model knows them.
"""

import argparse
import bz2
import lzma
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bpe  # noqa: E402

try:
    import pyppmd
except ImportError:
    pyppmd = None

# PPMd's model memory. On the corpus, order 12 primed gives the same bits with 1 GiB as with
# 3 GiB (the model fits, no restart), and 2.5% more with 256 MiB.
PPMD_MEMORY = 1 << 30
QUICK_PPMD_MEMORY = 16 << 20


def xz(data):
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def bzip2(data):
    return bz2.compress(data, 9)


def ppmd(order, memory):
    """A PPMd compressor of this order (the longest context it models) and model memory."""
    return lambda data: pyppmd.compress(data, max_order=order, mem_size=memory)


def compressed_bits(compress, data, primer=b""):
    """(Bits of data compressed after primer, less the primer's own, seconds taken)."""
    start = time.time()
    bits = 8 * len(compress(primer + data))
    if primer:
        bits -= 8 * len(compress(primer))
    return bits, time.time() - start


def compressors(train, quick):
    """[(name, compress, primer)] to measure; PPMd's only if pyppmd is installed."""
    rows = [("xz -9e (lzma)", xz, b""), ("bzip2 -9", bzip2, b"")]
    if pyppmd is None:
        print("PPMd skipped: pip install pyppmd")
        return rows
    memory = QUICK_PPMD_MEMORY if quick else PPMD_MEMORY
    rows.append(("PPMd order 10", ppmd(10, memory), b""))
    rows.append(("PPMd order 12, primed on train", ppmd(12, memory), train))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--data", default=bpe.default_data_dir(),
                        help="the corpus (a folder of .txt novels)")
    parser.add_argument("--quick", action="store_true", help="a 16 MiB PPMd model: a smoke test")
    args = parser.parse_args()
    train_docs, val_docs = bpe.split_corpus(bpe.read_corpus(args.data))
    val = "".join(text for _, text in val_docs)
    train = "".join(text for _, text in train_docs).encode("utf-8")
    names = ", ".join(name for name, _ in val_docs)
    print(f"validation split: {len(val):,} characters ({names})")
    rows = compressors(train, args.quick)
    print("\n| compressor | bits per character | seconds |")
    print("|---|---|---|")
    for name, compress, primer in rows:
        bits, seconds = compressed_bits(compress, val.encode("utf-8"), primer)
        print(f"| {name} | {bits / len(val):.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
