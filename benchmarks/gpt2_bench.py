"""
How fast gpt2.py trains and generates on this machine, at its default config.

  - Training: tokens per second through a whole optimizer step (batch sampling,
    forward, backward, gradient clipping, AdamW), the model FLOPs per second that
    makes (6 N per token for the weights, plus 12 * n_layer * n_embd * block_size
    for attention: the usual count, as in the PaLM paper's appendix B), that as a
    fraction of what one large matmul in the training precision reaches here, and
    the peak resident memory.
  - Generation: tokens per second for 240 new greedy tokens from a 16-token prompt (so
    the text fills the 256-token context), batch 1, with and without the KV-cache,
    and the cost per token early and late in the text: with the cache it stays flat.

Weights are random and tokens synthetic: speed does not depend on either.

    python benchmarks/gpt2_bench.py           # the default config: a minute or two on 2 cores
    python benchmarks/gpt2_bench.py --quick   # a tiny model: checks that it runs, in seconds
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt2  # noqa: E402


def bfloat16_autocast(device, dtype):
    """(autocast, whether it is on): the precision `train` picks for --dtype."""
    on = gpt2.use_bfloat16(device, dtype)
    return torch.autocast(device.type, torch.bfloat16, enabled=on), on


def train_speed(config, cfg, steps, device, compile):
    """(tokens/s, model FLOPs/s) over `steps` timed optimizer steps, after 2 untimed ones."""
    torch.manual_seed(0)
    model = gpt2.GPT(config).to(device)
    optimizer = gpt2.configure_optimizer(model, cfg, device)
    trained = torch.compile(model) if compile else model
    tokens = torch.randint(0, config.vocab_size, (1_000_000,), dtype=torch.int32).to(torch.uint16)
    generator = torch.Generator().manual_seed(0)
    autocast, _ = bfloat16_autocast(device, cfg.dtype)

    def step():
        x, y = gpt2.get_batch(tokens, cfg.batch_size, config.block_size, generator)
        loss = gpt2.train_step(trained, optimizer, x.to(device), y.to(device), cfg.grad_clip, autocast)
        loss.item()  # wait for the device

    for _ in range(2):  # warm-up: allocator, kernels, compilation
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    tokens_per_s = steps * cfg.batch_size * config.block_size / seconds
    n_weights = model.num_params() - model.transformer.wpe.weight.numel()  # position lookups do no matmul
    flops_per_token = 6 * n_weights + 12 * config.n_layer * config.n_embd * config.block_size
    return tokens_per_s, tokens_per_s * flops_per_token


def matmul_peak(device, dtype, n=2048, repeats=5):
    """FLOP/s of one large matmul in dtype: about the best this machine reaches."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c.sum().item()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def generation_speed(config, prompt_length, new_tokens, use_cache, device, repeats=3):
    """(tokens/s, ms per token for the first and the last quarter of the new tokens), best of repeats."""
    torch.manual_seed(0)
    model = gpt2.GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_length), device=device)
    best = None
    for _ in range(repeats + 1):  # the first is a warm-up
        times = [time.perf_counter()]
        for token in model.stream(prompt, new_tokens, temperature=0, use_cache=use_cache):
            token.item()
            times.append(time.perf_counter())
        if best is None or times[-1] - times[0] < best[-1] - best[0]:
            best = times
    quarter = max(1, new_tokens // 4)
    first = (best[quarter] - best[0]) / quarter * 1000
    last = (best[-1] - best[-1 - quarter]) / quarter * 1000
    return new_tokens / (best[-1] - best[0]), first, last


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="training precision, as gpt2.py train --dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.quick:
        config = gpt2.GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)
        cfg, steps, prompt_length, new_tokens = gpt2.TrainConfig(batch_size=4, dtype=args.dtype), 2, 4, 28
    else:
        config, cfg = gpt2.GPTConfig(), gpt2.TrainConfig(dtype=args.dtype)
        steps, prompt_length, new_tokens = args.steps, 16, 240
    _, bfloat16 = bfloat16_autocast(device, args.dtype)
    print(f"{config}, batch {cfg.batch_size}, {torch.get_num_threads()} threads, {device}, "
          f"{'bfloat16 autocast' if bfloat16 else 'float32'} training")

    # Generation first, in a fresh process as `python gpt2.py sample` runs. After a
    # training run in the same process, the C allocator keeps large freed blocks
    # (glibc raises its mmap threshold), which spares the no-cache path's big
    # per-step buffers their page faults: 25% faster, so the cache's lead shrinks.
    speeds = {}
    for use_cache in (True, False):
        speeds[use_cache], first, last = generation_speed(config, prompt_length, new_tokens, use_cache, device)
        print(f"generation, {'with' if use_cache else 'without'} cache: {speeds[use_cache]:,.0f} tokens/s "
              f"({prompt_length} + {new_tokens} tokens, batch 1) | {first:.2f} ms/token in the first quarter, "
              f"{last:.2f} in the last")
    print(f"cache speed-up: {speeds[True] / speeds[False]:.1f}x")

    tokens_per_s, flops = train_speed(config, cfg, steps, device, args.compile)
    peak = matmul_peak(device, torch.bfloat16 if bfloat16 else torch.float32)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(f"training:   {tokens_per_s:,.0f} tokens/s | {flops / 1e9:.1f} GFLOP/s model FLOPs = "
          f"{flops / peak:.0%} of a large matmul's {peak / 1e9:.1f} GFLOP/s | peak RSS {peak_rss:.2f} GiB")


if __name__ == "__main__":
    main()
