"""
mixtral.py against its dense sibling mistral.py: training tokens per second at equal
active parameters per token, side by side in one process.

Both at their default configs, which have the same active parameters: mixtral.py's
experts are mistral.py's MLP width / n_expert_per_token wide, so a token's experts
cost what mistral.py's MLP costs, plus the router. Whole optimizer steps (batch
sampling, forward, backward, clipping, AdamW), batch 32 x 256 tokens, in the
precision `train` picks; the two models alternate, `--rounds` times, and each
model's best round counts. The goal: the mixture at least 0.67x the dense
tokens/s (its step at most 1.5x). Random weights and tokens: speed depends on neither.

    python benchmarks/moe_bench.py            # a few minutes on 2 cores
    python benchmarks/moe_bench.py --quick    # tiny models: checks that it runs
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mistral as dense  # noqa: E402
import mixtral  # noqa: E402
from compare_models import train_speed  # noqa: E402  (this folder is on the path of a script run from it)

MODELS = [(dense, dense.MistralConfig, dense.Mistral), (mixtral, mixtral.MixtralConfig, mixtral.Mixtral)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each timing both models")
    args = parser.parse_args()
    shape = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32, n_kv_head=1) if args.quick else {}
    steps, rounds = (1, 1) if args.quick else (args.steps, args.rounds)
    cfg = mixtral.TrainConfig()
    models = []
    for module, config_class, model_class in MODELS:
        torch.manual_seed(0)
        model = model_class(config_class(**shape))
        active = model.num_params(active=True) if module is mixtral else model.num_params()
        models.append((module, model, active, []))
    for _ in range(rounds):  # alternating, so that a slow spell of the machine hits both
        for module, model, _, speeds in models:
            speeds.append(train_speed(module, model, model.config, steps))
    print(f"{torch.get_num_threads()} threads; batch {cfg.batch_size} x {models[0][1].config.block_size}, "
          f"{rounds} rounds of {steps} steps, best round\n")
    print("| model | parameters | active per token | training tokens/s | vs the dense model |")
    print("|---|---|---|---|---|")
    for module, model, active, speeds in models:
        print(f"| {module.__name__}.py | {model.num_params() / 1e6:.2f} M | {active / 1e6:.2f} M | {max(speeds):,.0f} | "
              f"{max(speeds) / max(models[0][3]):.2f}x |")


if __name__ == "__main__":
    main()
