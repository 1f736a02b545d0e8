"""
Every model file side by side, at its default config, in one run: the speed and memory
columns of the README's comparison table.

For each model: total parameters and those active per token (a mixture of experts runs
only the chosen experts); training tokens per second (whole optimizer steps, batch 32 x
block_size tokens, in the precision `train` picks); generation tokens per second for 240
new tokens from a 16-token prompt (the text fills the 256-token context), batch 1, greedy,
with the KV-cache and without it (gpt1.py has none), all measured before any training
step; and the KV-cache's bytes (float32) per token of context and when the text is 4x
block_size long, read off the cache object itself. Weights are random and tokens
synthetic: speed depends on neither.

    python benchmarks/compare_models.py            # several minutes on 2 cores
    python benchmarks/compare_models.py --quick    # tiny models: checks that it runs
"""

import argparse
import importlib
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {  # file: (config class, model class)
    "gpt1": ("GPTConfig", "GPT"), "gpt2": ("GPTConfig", "GPT"), "llama": ("LlamaConfig", "Llama"),
    "mistral": ("MistralConfig", "Mistral"), "mixtral": ("MixtralConfig", "Mixtral"), "gemma": ("GemmaConfig", "Gemma"),
    "qwen3": ("Qwen3Config", "Qwen3"), "gemma3": ("Gemma3Config", "Gemma3"), "deepseek": ("DeepSeekConfig", "DeepSeek"),
    "gpt_oss": ("GptOssConfig", "GptOss"),
}
QUICK = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)  # where a config has them


def train_speed(module, model, config, steps):
    """Tokens per second over `steps` optimizer steps, after one untimed step."""
    cfg = module.TrainConfig()
    device = torch.device("cpu")
    optimizer = module.configure_optimizer(model, cfg, device)
    # bfloat16 matmuls where the CPU has them, as `train` picks
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=module.use_bfloat16(device, "auto"))
    tokens = torch.randint(0, config.vocab_size, (1_000_000,), dtype=torch.int32).to(torch.uint16)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        x, y = module.get_batch(tokens, cfg.batch_size, config.block_size, generator)
        module.train_step(model, optimizer, x.to(device), y.to(device), cfg.grad_clip, autocast).item()
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


def active_params(model, config):
    """Parameters a token runs through: of each block's experts, only n_expert_per_token of n_expert."""
    n_expert = getattr(config, "n_expert", None)
    if not n_expert:
        return model.num_params()
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return model.num_params() - experts + experts * config.n_expert_per_token // n_expert


def cache_bytes(module, config):
    """The KV-cache's bytes per token of context, and in all for a text of 4 x block_size tokens:
    gpt2.py and llama.py re-fill a block_size cache past the context, mistral.py rolls a window,
    gemma3.py does both, layer by layer: per token of the longest layer's slots. Its buffers are
    the lists the cache holds (keys and values, or deepseek.py's latents), slots along dim -2."""
    if not hasattr(module, "KVCache"):
        return None, None
    cache = module.KVCache(config, 1, torch.device("cpu"), torch.float32)
    lists = [value for value in vars(cache).values() if isinstance(value, list)]
    buffers = [t for value in lists for t in value if isinstance(t, torch.Tensor)]
    total = sum(t.nbytes for t in buffers)
    slots = max(t.size(-2) for t in buffers)
    return total // slots, total * min(1, 4 * config.block_size / slots)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="which files")
    args = parser.parse_args()
    steps, prompt_length, new_tokens = (1, 4, 28) if args.quick else (5, 16, 240)
    print(f"{torch.get_num_threads()} threads; batch 32 x block for training, batch 1 greedy for generation\n")
    print("| model | parameters | active per token | training tokens/s | generation tokens/s, cache | without cache "
          "| KV-cache bytes per token | at 4x block_size |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    # All generation before any training, as `sample` runs in a fresh process: after training, the C
    # allocator keeps large freed blocks, which flatters the no-cache path (benchmarks/README.md).
    for name in args.models:
        module = importlib.import_module(name)
        config_class, model_class = (getattr(module, n) for n in MODELS[name])
        names = {f.name for f in fields(config_class)}
        config = config_class(**{k: v for k, v in QUICK.items() if k in names} if args.quick else {})
        torch.manual_seed(0)
        model = model_class(config)
        per_token, at_4x = cache_bytes(module, config)
        no_cache = dict(use_cache=False) if per_token else {}
        without = generation_speed(model, config, prompt_length, new_tokens, **no_cache)
        cached = f"{generation_speed(model, config, prompt_length, new_tokens):,.0f}" if per_token else "(none)"
        memory = f"{per_token:,} | {at_4x / 2**20:.2f} MiB" if per_token else "(none) | (none)"
        rows.append((module, model, config, f"{cached} | {without:,.0f} | {memory}"))
    for module, model, config, generation in rows:
        training = train_speed(module, model, config, steps)
        print(f"| {module.MODEL} | {model.num_params() / 1e6:.2f}M | {active_params(model, config) / 1e6:.2f}M | "
              f"{training:,.0f} | {generation} |")


if __name__ == "__main__":
    main()
