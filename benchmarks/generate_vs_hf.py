"""
gpt2.py's generation against Hugging Face transformers', with the same weights.

Batch 1, greedy, on the CPU: our `GPT.generate` with the KV-cache against
`GPT2LMHeadModel.generate(do_sample=False, use_cache=True)`, in tokens per second,
at two shapes: gpt2.py's default config (5.6 M parameters, 22 MB of float32
weights: streaming them and each step's Python and small kernels share the time)
and GPT-2 124M's (500 MB: streaming the weights decides). The weights are random,
the same for both: a random GPT2LMHeadModel saved with save_pretrained and read
with GPT.from_pretrained. A last table times one vector times each weight matrix
in nn.Linear's layout and transposed in memory, the one lever on a cached step's
speed that keeps the weights' values.
Each runs once to warm up, then they take turns, and the best of --repeats runs counts.

    python benchmarks/generate_vs_hf.py           # both shapes: about 7 minutes on 2 cores
    python benchmarks/generate_vs_hf.py --quick   # a tiny model: checks that it runs, in seconds

Needs transformers (requirements-dev.txt).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
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


def best_times(generators, repeats):
    """For each of `generators`, (seconds of its fastest run, its output): each runs
    once to warm up, then they take turns, `repeats` runs each, so that a slow spell
    of the machine falls on all of them alike."""
    for generate in generators:
        generate()
    best, outputs = [float("inf")] * len(generators), [None] * len(generators)
    for _ in range(repeats):
        for i, generate in enumerate(generators):
            start = time.perf_counter()
            outputs[i] = generate()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, outputs))


def overhead_per_step(shape, prompt_length, new_tokens, repeats):
    """Milliseconds per generated token of our generate at the same depth and number
    of heads but width 2 per head and 64 tokens: matrices so small that what is
    left is each step's Python and the dispatch of its small kernels."""
    torch.manual_seed(0)
    config = gpt2.GPTConfig(vocab_size=64, block_size=shape["n_positions"], n_layer=shape["n_layer"],
                            n_head=shape["n_head"], n_embd=2 * shape["n_head"])
    model = gpt2.GPT(config).eval()
    prompt = torch.randint(0, 64, (1, prompt_length))
    [(seconds, _)] = best_times([lambda: model.generate(prompt, new_tokens, temperature=0)], repeats)
    return seconds / new_tokens * 1000


def compare(name, shape, prompt_length, new_tokens, repeats):
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = same_weights(shape, folder)
    prompt = torch.randint(0, shape["vocab_size"], (1, prompt_length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)

    def generate_theirs():
        with torch.inference_mode():
            return theirs.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                   use_cache=True, pad_token_id=0)

    (our_seconds, our_tokens), (their_seconds, their_tokens) = best_times(
        [lambda: ours.generate(prompt, new_tokens, temperature=0), generate_theirs], repeats)
    ours_per_s, theirs_per_s = new_tokens / our_seconds, new_tokens / their_seconds
    same = "yes" if torch.equal(our_tokens, their_tokens) else "no (float32 near-ties)"
    print(f"{name:<16} {ours.num_params() / 1e6:>7.1f}M {prompt_length:>4} + {new_tokens:<4} "
          f"{ours_per_s:>10,.0f} {theirs_per_s:>14,.0f} {ours_per_s / theirs_per_s:>7.2f}x   "
          f"{same}")
    print(f"{'':<16} ms per token: ours {1000 / ours_per_s:.2f} (the same loop with tiny matrices: "
          f"{overhead_per_step(shape, prompt_length, new_tokens, repeats):.2f}), transformers {1000 / theirs_per_s:.2f}")


def matrix_vector_times(name, shape, repeats=300):
    """For each weight matrix of a GPT-2 block and the head: microseconds to multiply
    one vector by it, stored as nn.Linear keeps it, (out, in) with rows of length
    in, and transposed in memory, with rows of length out. Each is timed cycling
    through 32 MB of copies, so that, as in a generation step, it comes from memory
    rather than from a cache that has just held it."""
    print(f"{name}: {'matrix':<12} {'in -> out':<15} {'(out, in)':>10} {'transposed':>12}")
    C, V = shape["n_embd"], shape["vocab_size"]
    for matrix, in_features, out_features in [("c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, 4 * C),
                                            ("mlp.c_proj", 4 * C, C), ("head", C, V)]:
        copies = max(2, 32 * 2**20 // (4 * in_features * out_features))
        x = torch.randn(1, in_features)
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        transposed = [w.t().contiguous().t() for w in weights]
        times = []
        for layout in (weights, transposed):
            layers = [nn.Linear(in_features, out_features, bias=False) for _ in range(copies)]
            for layer, w in zip(layers, layout):
                layer.weight.data = w
            for layer in layers[:2]:
                layer(x)  # warm-up
            start = time.perf_counter()
            for i in range(repeats):
                layers[i % copies](x)
            times.append((time.perf_counter() - start) / repeats * 1e6)
        print(f"  {matrix:<12} {in_features:>5} -> {out_features:<6} {times[0]:>10.0f} {times[1]:>12.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model only: a smoke test")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per side; the best counts")
    parser.add_argument("--shape", choices=[name for name, *_ in SHAPES], help="only this shape (default: both)")
    args = parser.parse_args()
    logging.disable_progress_bar()  # save_pretrained would draw one

    shapes = QUICK if args.quick else [s for s in SHAPES if args.shape in (None, s[0])]
    print(f"CPU, batch 1, greedy, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'shape':<16} {'params':>8} {'tokens':>11} {'ours tok/s':>10} {'transformers':>14} {'ratio':>8}   "
          f"same tokens")
    for name, shape, prompt_length, new_tokens in shapes:
        compare(name, shape, prompt_length, new_tokens, args.repeats)
    print(f"\nOne vector times each weight matrix, microseconds: as nn.Linear stores it, (out, in), and "
          f"transposed in memory ({torch.get_num_threads()} threads)")
    for name, shape, *_ in shapes:
        matrix_vector_times(name, shape)


if __name__ == "__main__":
    main()
