"""
Cached generation as the text grows: llama.py's KV-cache against mistral.py's rolling buffer.

For each model at its default config and a text of 1x, 4x and 16x block_size tokens: milliseconds
per token of the cached steps that bring the text to that length (batch 1, greedy, float32; the
first step, which fills the cache from the prompt, not counted), and the bytes of the KV-cache that
generation allocates. Past block_size llama.py re-fills its cache from the cropped window at every
step; mistral.py's sliding_window slots roll on. Weights are random and tokens synthetic.

    python benchmarks/long_text.py            # a few minutes on 2 cores
    python benchmarks/long_text.py --quick    # tiny models: checks that it runs
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama  # noqa: E402
import mistral  # noqa: E402

MODELS = [(llama, llama.LlamaConfig, llama.Llama), (mistral, mistral.MistralConfig, mistral.Mistral)]


def ms_per_token(model, length, steps, repeats=3):
    """Milliseconds per cached step over the last `steps` tokens of a `length`-token text, best of
    `repeats` after a warm-up."""
    prompt = torch.randint(0, model.config.vocab_size, (1, length - steps))
    best = math.inf
    for _ in range(repeats + 1):
        tokens = model.stream(prompt, steps + 1, temperature=0)
        next(tokens)  # the prompt into the cache, and the first token
        start = time.perf_counter()
        for _ in tokens:
            pass
        best = min(best, time.perf_counter() - start)
    return 1000 * best / steps


def cache_bytes(module, config):
    """Bytes of the KV-cache that generation allocates at batch 1 in float32, whatever the text's length."""
    cache = module.KVCache(config, 1, "cpu", torch.float32)
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test")
    args = parser.parse_args()
    shape = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32) if args.quick else {}
    steps = 5 if args.quick else 50
    print(f"{torch.get_num_threads()} threads; batch 1, greedy, float32, random weights\n")
    print("| model | text length | cached step, ms/token | KV-cache bytes |")
    print("|---|---|---|---|")
    for module, config_class, model_class in MODELS:
        window = dict(sliding_window=8) if args.quick and module is mistral else {}
        config = config_class(**shape, **window)
        torch.manual_seed(0)
        model = model_class(config).eval()
        name = module.MODEL + (f" (window {config.sliding_window})" if module is mistral else "")
        for times in (1, 4, 16):
            length = times * config.block_size
            print(f"| {name} | {length:,} ({times}x block_size) | {ms_per_token(model, length, steps):.2f} | "
                  f"{cache_bytes(module, config):,} |", flush=True)


if __name__ == "__main__":
    main()
