"""
gpt2.py's generation against Hugging Face transformers', with the same weights.

Batch 1, greedy, on the CPU: our `GPT.generate` with the KV-cache against
`GPT2LMHeadModel.generate(do_sample=False, use_cache=True)`, in tokens per second,
at two shapes: gpt2.py's default config (a few million parameters: the cost of
each step's Python and small kernels decides) and GPT-2 124M's (reading the
weights from memory decides). The weights are random, the same for both: a random
GPT2LMHeadModel saved with save_pretrained and read with GPT.from_pretrained.
Each side decodes once to warm up, then the best of --repeats runs counts.

    python benchmarks/generate_vs_hf.py           # both shapes: a few minutes on 2 cores
    python benchmarks/generate_vs_hf.py --quick   # a tiny model: checks that it runs, in seconds

Needs transformers (requirements-dev.txt).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt2  # noqa: E402

# (name, GPT2Config arguments, prompt tokens, new tokens)
SHAPES = [
    ("gpt2.py default", dict(vocab_size=3000, n_positions=256, n_layer=6, n_head=8, n_embd=256), 16, 240),
    ("GPT-2 124M", dict(vocab_size=50257, n_positions=1024, n_layer=12, n_head=12, n_embd=768), 16, 240),
]
QUICK = [("tiny", dict(vocab_size=300, n_positions=32, n_layer=2, n_head=2, n_embd=32), 4, 28)]


def same_weights(shape, folder):
    """A random GPT2LMHeadModel and our GPT holding the same weights, both in eval mode."""
    torch.manual_seed(0)
    # No end-of-text token: transformers would stop at it, and we want every new token.
    theirs = GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=None, eos_token_id=None)).eval()
    theirs.save_pretrained(folder)
    return gpt2.GPT.from_pretrained(folder), theirs


def best_time(generate, repeats):
    """(seconds of the fastest of `repeats` runs after one warm-up, the last run's output)."""
    generate()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate()
        best = min(best, time.perf_counter() - start)
    return best, out


def compare(name, shape, prompt_length, new_tokens, repeats):
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = same_weights(shape, folder)
    prompt = torch.randint(0, shape["vocab_size"], (1, prompt_length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)

    def generate_ours():
        return ours.generate(prompt, new_tokens, temperature=0)

    def generate_theirs():
        with torch.inference_mode():
            return theirs.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                   use_cache=True, pad_token_id=0)

    our_seconds, our_tokens = best_time(generate_ours, repeats)
    their_seconds, their_tokens = best_time(generate_theirs, repeats)
    ours_per_s, theirs_per_s = new_tokens / our_seconds, new_tokens / their_seconds
    same = "yes" if torch.equal(our_tokens, their_tokens) else "no (float32 near-ties)"
    print(f"{name:<16} {ours.num_params() / 1e6:>7.1f}M {prompt_length:>4} + {new_tokens:<4} "
          f"{ours_per_s:>10,.0f} {theirs_per_s:>14,.0f} {ours_per_s / theirs_per_s:>7.2f}x   {same}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model only: a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best counts")
    parser.add_argument("--shape", choices=[name for name, *_ in SHAPES], help="only this shape (default: both)")
    args = parser.parse_args()
    logging.disable_progress_bar()  # save_pretrained would draw one

    shapes = QUICK if args.quick else [s for s in SHAPES if args.shape in (None, s[0])]
    print(f"CPU, batch 1, greedy, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'shape':<16} {'params':>8} {'tokens':>11} {'ours tok/s':>10} {'transformers':>14} {'ratio':>8}   "
          f"same tokens")
    for name, shape, prompt_length, new_tokens in shapes:
        compare(name, shape, prompt_length, new_tokens, args.repeats)


if __name__ == "__main__":
    main()
