"""
gpt1.py, gpt2.py, llama.py and mistral.py side by side, at their default configs, in one run.

For each model: parameters; training tokens per second (whole optimizer steps,
batch 32 x 256 tokens, in the precision `train` picks); generation tokens per
second for 240 new tokens from a 16-token prompt (the text fills the 256-token
context), batch 1, greedy, with the KV-cache and without it (gpt1.py has none),
all measured before any training step, in one process.
Weights are random and tokens synthetic: speed depends on neither.

    python benchmarks/compare_models.py            # a few minutes on 2 cores
    python benchmarks/compare_models.py --quick    # tiny models: checks that it runs
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt1  # noqa: E402
import gpt2  # noqa: E402
import llama  # noqa: E402
import mistral  # noqa: E402

MODELS = [(gpt1, gpt1.GPTConfig, gpt1.GPT), (gpt2, gpt2.GPTConfig, gpt2.GPT), (llama, llama.LlamaConfig, llama.Llama),
          (mistral, mistral.MistralConfig, mistral.Mistral)]


def train_speed(module, model, config, steps):
    """Tokens per second over `steps` optimizer steps, after one untimed step."""
    cfg = module.TrainConfig()
    device = torch.device("cpu")
    optimizer = module.configure_optimizer(model, cfg, device)
    cpu = torch.cpu.get_capabilities()  # bfloat16 matmuls where the CPU has them, as `train` picks
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=bool(cpu.get("avx512_bf16") or cpu.get("amx_bf16")))
    tokens = torch.randint(0, config.vocab_size, (1_000_000,), dtype=torch.int32).to(torch.uint16)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        module.train_step(model, optimizer, tokens, cfg, config, generator, device, autocast).item()
    return steps * cfg.batch_size * config.block_size / (time.perf_counter() - start)


def generation_speed(model, config, prompt_length, new_tokens, repeats=3, **cache):
    """Tokens per second, best of `repeats` after a warm-up."""
    model.eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_length))
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0, **cache)
        best = min(best, time.perf_counter() - start)
    model.train()
    return new_tokens / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test")
    args = parser.parse_args()
    shape = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32) if args.quick else {}
    steps, prompt_length, new_tokens = (1, 4, 28) if args.quick else (5, 16, 240)
    print(f"{torch.get_num_threads()} threads; batch 32 x block for training, batch 1 greedy for generation\n")
    print("| model | parameters | training tokens/s | generation tokens/s, cache | without cache |")
    print("|---|---|---|---|---|")
    rows = []
    # All generation before any training, as `sample` runs in a fresh process: after training, the C
    # allocator keeps large freed blocks, which flatters the no-cache path (benchmarks/README.md).
    for module, config_class, model_class in MODELS:
        config = config_class(**shape, **(dict(n_kv_head=1) if args.quick and module in (llama, mistral) else {}))
        torch.manual_seed(0)
        model = model_class(config)
        no_cache = dict(use_cache=False) if module is not gpt1 else {}
        without = generation_speed(model, config, prompt_length, new_tokens, **no_cache)
        cached = "(none)" if module is gpt1 else f"{generation_speed(model, config, prompt_length, new_tokens):,.0f}"
        rows.append((module, model, config, cached, without))
    for module, model, config, cached, without in rows:
        training = train_speed(module, model, config, steps)
        print(f"| {module.MODEL} | {model.num_params() / 1e6:.2f}M | {training:,.0f} | {cached} | {without:,.0f} |")


if __name__ == "__main__":
    main()
