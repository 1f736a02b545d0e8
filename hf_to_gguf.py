"""
Our models into llama.cpp: a Hugging Face folder that `export` wrote, as one GGUF file.

GGUF is llama.cpp's format, read by everything built on it (llama-cli, Ollama, LM Studio):
the model's hyperparameters and tokenizer as key-value metadata, then its tensors under
llama.cpp's names. The `gguf` package, llama.cpp's own Python library, writes it: its
writer, its metadata keys and its map from Hugging Face's tensor names to llama.cpp's.

    python llama.py export --out-dir checkpoints/llama --to llama-hf
    python hf_to_gguf.py llama-hf llama.gguf [--dtype f16]
    llama-cli -m llama.gguf -p "Мой дядя"

Architectures: gpt2, llama (llama.py, mistral.py, and mixtral.py as llama with experts),
gemma, qwen3, gemma3 and gemma2 (gemma3.py), gpt-oss, and deepseek2 (deepseek.py). Where
llama.cpp would compute another model than ours, the folder is refused, never written. Within
the context, that is: past it, llama.cpp attends to every key, where our models crop or slide
their window.
"""

import argparse
import os
import struct
import sys
from pathlib import Path

import safetensors.torch
import torch

import bpe

try:
    import gguf
except ImportError:
    gguf = None

# config.json's model_type: llama.cpp's architecture.
ARCHITECTURES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "gemma": "gemma",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma2": "gemma2",
    "gpt_oss": "gpt-oss",
    "deepseek_v3": "deepseek2",
}
# Gemma 2 and 3: layers with windows, and llama.cpp's Gemma norms (1 + w stored as w).
SWA = ("gemma2", "gemma3")
GEMMA = ("gemma", *SWA)
# GPT-2's Conv1D weights are (in, out); llama.cpp's, as nn.Linear's, (out, in).
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
DTYPES = ("f32", "f16", "bf16")
# DeepSeek-V3's config.json keys: deepseek2's (GGUFWriter.add_NAME).
MLA_KEYS = {
    "kv_lora_rank": "kv_lora_rank",
    "first_k_dense_replace": "leading_dense_block_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "n_routed_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "n_shared_experts": "expert_shared_count",
    "n_group": "expert_group_count",
    "topk_group": "expert_group_used_count",
    "routed_scaling_factor": "expert_weights_scale",
    "norm_topk_prob": "expert_weights_norm",
}
# DeepSeek-V3's projections whose last qk_rope_head_dim rows of each head make q_rope or k_rope.
ROPE_ROWS = (".q_proj.weight", ".q_b_proj.weight", ".kv_a_proj_with_mqa.weight")


def check(ok, message):
    if not ok:
        raise ValueError(message)


def read_folder(folder):
    """config.json, the weights and the tokenizer of an exported folder."""
    folder = Path(folder)
    check((folder / "config.json").is_file(), f"{folder} has no config.json: export a run first")
    config = bpe.read_json(folder / "config.json")
    check(config.get("model_type") in ARCHITECTURES,
          f"{folder} holds a {config.get('model_type')!r} model; hf_to_gguf.py converts "
          f"{', '.join(ARCHITECTURES)}")
    path = folder / "model.safetensors"
    check(path.is_file(), f"{folder} has no model.safetensors")
    try:
        weights = safetensors.torch.load_file(path)
    except Exception:  # truncated, foreign, ...
        raise ValueError(f"{path} is corrupt: it cannot be read") from None
    tok = bpe.Tokenizer.from_pretrained(folder)
    check(tok.vocab_size <= config.get("vocab_size", 0) and None not in (tok.bos_id, tok.eos_id),
          f"{folder}'s tokenizer does not fit its model: {tok.vocab_size} tokens for "
          f"{config.get('vocab_size')}, beginning and end {tok.bos_id} and {tok.eos_id}")
    # llama.cpp's "gpt-2" pre-tokenizer is GPT-2's regex, the one bpe.py trains with.
    check(type(tok) is bpe.Tokenizer and tok.pattern == bpe.GPT2_PATTERN and not tok.nfc,
          f"{folder}'s tokenizer is not a byte-level BPE with GPT-2's split, as bpe.py's")
    return config, weights, tok


def check_computable(arch, config):
    """Refuse what llama.cpp would compute differently from our model."""
    context = config.get("max_position_embeddings") or config.get("n_positions")
    window = config.get("sliding_window")
    # llama.cpp's llama has no window: past it, it would attend to keys ours does not.
    check(arch in (*SWA, "gpt-oss") or window is None or window >= context,
          f"sliding_window {window} is shorter than the context ({context}): llama.cpp's llama "
          "would attend to the whole context")
    rope = config.get("rope_parameters") or {}
    check(not config.get("rope_scaling") and rope.get("rope_type", "default") == "default",
          "RoPE scaling is not converted: llama.cpp would run unscaled")
    check(arch != "gpt-oss" or config["swiglu_limit"] == 7.0,
          f"swiglu_limit {config.get('swiglu_limit')}: llama.cpp's clamps at 7")
    check(arch != "deepseek2" or config["n_shared_experts"] > 0,
          "n_shared_experts 0: llama.cpp's deepseek2 has shared experts in every MoE block")
    # llama.cpp takes 26 or 27 layers for DeepSeek-V2-Lite, with one q_proj.
    lite = arch == "deepseek2" and config["num_hidden_layers"] in (26, 27)
    check(not lite or not config["q_lora_rank"], "q_lora_rank in 26 or 27 layers: not Lite")
    # llama.cpp scales Gemma's scores by 1 / sqrt(head_dim), whatever query_pre_attn_scalar says.
    scalar = config.get("query_pre_attn_scalar")
    check(arch not in SWA or scalar == config.get("head_dim"),
          f"query_pre_attn_scalar {scalar} is not head_dim: llama.cpp scales by head_dim")


def write_hyperparameters(writer, arch, config):
    """The shape, in llama.cpp's metadata keys (gguf.Keys) for the architecture."""
    if arch == "gpt2":
        writer.add_context_length(config["n_positions"])
        writer.add_embedding_length(config["n_embd"])
        writer.add_block_count(config["n_layer"])
        writer.add_feed_forward_length(4 * config["n_embd"])
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        return
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    if arch == "deepseek2":
        return write_mla(writer, config)
    head_dim = config["head_dim"]
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if config.get("num_local_experts"):
        writer.add_expert_count(config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
    # Windows in every second layer, from the first, as ours.
    if arch == "gpt-oss":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_expert_feed_forward_length(config["intermediate_size"])
    if arch in SWA:
        write_windows(writer, arch, config)


def write_mla(writer, config):
    """DeepSeek-V3's MLA and experts in llama.cpp's deepseek2 keys: one key and value head
    over the latent (plus k_rope for the keys), as deepseek.py decodes."""
    rope_dim = config["qk_rope_head_dim"]
    writer.add_key_length(config["kv_lora_rank"] + rope_dim)
    writer.add_value_length(config["kv_lora_rank"])
    writer.add_key_length_mla(config["qk_nope_head_dim"] + rope_dim)
    writer.add_value_length_mla(config["v_head_dim"])
    writer.add_rope_dimension_count(rope_dim)
    # 0: one q_proj.
    writer.add_q_lora_rank(config["q_lora_rank"] or 0)
    for key, name in MLA_KEYS.items():
        getattr(writer, f"add_{name}")(config[key])
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def write_windows(writer, arch, config):
    """Gemma 2's and 3's local layers and soft-capping. llama.cpp's gemma2 has every second
    layer global; its gemma3 reads the pattern."""
    types = config["layer_types"]
    writer.add_sliding_window(config["sliding_window"])
    if arch == "gemma3":
        pattern = (types + ["full_attention"]).index("full_attention") + 1
        writer.add_sliding_window_pattern(pattern)
        writer.add_rope_freq_base_swa(config["rope_local_base_freq"])
    else:
        check(types[1::2] == ["full_attention"] * (len(types) // 2),
              f"layer_types {types}: llama.cpp's gemma2 has every second layer global")
        check(config["attn_logit_softcapping"] and config["final_logit_softcapping"],
              "llama.cpp's gemma2 soft-caps both the scores and the logits; this model does not")
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config["final_logit_softcapping"]:
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])


def write_tokenizer(writer, tok):
    """Our byte-level BPE as llama.cpp's "gpt2" tokenizer: the tokens as GPT-2's
    printable stand-ins, id by id, the merges in rank order, the special tokens marked."""
    pieces = tok.to_dict()["id2token"]
    tokens = [pieces[str(id)] for id in range(tok.vocab_size)]
    specials = set(tok.special_tokens.values())
    types = [gguf.TokenType.CONTROL if id in specials else gguf.TokenType.NORMAL
             for id in range(tok.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{pieces[str(a)]} {pieces[str(b)]}" for a, b in tok.merges])
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(tok.add_bos)


def permute_for_rope(weight, n_head):
    """q or k rows from our RoPE layout (feature i pairs with i + head_size / 2, as
    transformers') to llama.cpp's llama (i pairs with i + 1), as llama.cpp's converter does."""
    rows = weight.shape[0]
    halves = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def llama_cpp_tensors(arch, config, weights):
    """(Hugging Face name, tensor) in llama.cpp's layout: GPT-2's Conv1D transposed; for
    llama, q and k permuted and each layer's experts stacked into one tensor; for Gemma,
    RMSNorm's 1 + w as w (llama.cpp's Gemma norm multiplies by the stored weight). Qwen3's
    and gpt-oss's RoPE turns halves in llama.cpp too, as transformers'."""
    experts = {}
    for name, weight in weights.items():
        if arch == "gpt-oss":
            yield from gpt_oss_tensors(name, weight)
            continue
        if arch == "deepseek2":
            name, weight = deepseek2_tensor(name, weight, config)
        if name.endswith("kv_b_proj.weight"):
            yield from split_kv_b(name, weight, config)
            continue
        if arch == "gpt2" and name.endswith(CONV1D):
            weight = weight.t()
        if arch in GEMMA and name.endswith("norm.weight"):
            weight = weight + 1
        if arch == "llama" and name.endswith("q_proj.weight"):
            weight = permute_for_rope(weight, config["num_attention_heads"])
        if arch == "llama" and name.endswith("k_proj.weight"):
            weight = permute_for_rope(weight, config["num_key_value_heads"])
        parts = name.split(".")
        if "experts" in parts:
            # ...block_sparse_moe.experts.3.w1.weight, expert 3's w1, joins ...experts.w1.weight
            i = parts.index("experts")
            merged = ".".join(parts[: i + 1] + parts[i + 2 :])
            experts.setdefault(merged, {})[int(parts[i + 1])] = weight
            continue
        yield name, weight
        # llama.cpp's gpt2 reads its head from output.weight, the token embedding's twin.
        if arch == "gpt2" and name == "transformer.wte.weight":
            yield "lm_head.weight", weight
    for name, by_expert in experts.items():
        yield name, torch.stack([by_expert[i] for i in sorted(by_expert)])  # (n_expert, out, in)


def gpt_oss_tensors(name, weight):
    """gpt-oss's tensors as llama.cpp's map names them: gate_up_proj (n_expert, in,
    2 * out), gate and up in turn, split (n_expert, out, in)."""
    prefix, stacked, kind = name.partition("experts.")
    if not stacked:
        yield name.replace(".sinks", ".sinks.weight"), weight
    elif kind == "gate_up_proj":
        yield prefix + "experts.gate_proj.weight", weight.transpose(1, 2)[:, 0::2]
        yield prefix + "experts.up_proj.weight", weight.transpose(1, 2)[:, 1::2]
    elif kind == "gate_up_proj_bias":
        yield prefix + "experts.gate_proj.bias", weight[:, 0::2]
        yield prefix + "experts.up_proj.bias", weight[:, 1::2]
    elif kind == "down_proj":
        yield name + ".weight", weight.transpose(1, 2)
    else:
        yield prefix + "experts.down_proj.bias", weight


def deepseek2_tensor(name, weight, config):
    """DeepSeek-V3's tensor as llama.cpp's deepseek2 reads it: the rows that make q_rope and
    k_rope turn neighbours, as DeepSeek's own weights do (rope_interleave; our export turns
    halves); the router's bias under the name the map knows."""
    name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    rope_dim = config["qk_rope_head_dim"]
    if config.get("rope_interleave", True) or not name.endswith(ROPE_ROWS):
        return name, weight
    head_dim = config["qk_nope_head_dim"] + rope_dim
    if "kv_a_proj" in name:
        head_dim = config["kv_lora_rank"] + rope_dim
    w = weight.reshape(-1, head_dim, weight.size(-1))  # (heads, head_dim, in)
    halves = w[:, head_dim - rope_dim :].unflatten(1, (2, rope_dim // 2))
    rope = halves.transpose(1, 2).flatten(1, 2)  # (heads, rope_dim, in): x0 x_d/2 x1 ...
    return name, torch.cat([w[:, : head_dim - rope_dim], rope], dim=1).view(weight.shape)


def split_kv_b(name, weight, config):
    """kv_b_proj (n_head * (qk_nope + v), kv_lora_rank) as llama.cpp's MLA wants it: k_b
    (n_head, kv_lora_rank, qk_nope), to absorb into the queries, and v_b (n_head, v,
    kv_lora_rank)."""
    nope = config["qk_nope_head_dim"]
    kv_b = weight.unflatten(0, (config["num_attention_heads"], -1))
    yield name.replace("kv_b_proj", "k_b_proj"), kv_b[:, :nope].transpose(1, 2)
    yield name.replace("kv_b_proj", "v_b_proj"), kv_b[:, nope:]


def convert(folder, path, dtype="f32"):
    """Write the exported folder as the GGUF file at path (atomically). Raises ValueError
    for what llama.cpp cannot run as our model, or a folder that is not an export."""
    check(gguf is not None, "hf_to_gguf.py needs the gguf package: pip install gguf")
    check(Path(folder).resolve() not in Path(path).resolve().parents,
          f"{path} is inside {folder}: write the GGUF file elsewhere")
    config, weights, tok = read_folder(folder)
    try:
        write_gguf(folder, path, dtype, config, weights, tok)
    # A key missing, or a number that is None or not a number.
    except (KeyError, TypeError, struct.error) as e:
        raise ValueError(f"{folder}/config.json lacks a value or mistypes one ({e})") from None


def write_gguf(folder, path, dtype, config, weights, tok):
    """convert's work, on a folder read and checked."""
    arch = ARCHITECTURES[config["model_type"]]
    check_computable(arch, config)
    # transformers' head_dim where config.json leaves it out: Qwen3's is 128, not the width's share.
    if arch == "qwen3":
        config = {"head_dim": 128, **config}
    elif arch != "gpt2":
        config = {"head_dim": config["hidden_size"] // config["num_attention_heads"], **config}
    # llama.cpp's MLA: one key and value head, shared by all (see write_mla).
    if arch == "deepseek2":
        config = {**config, "num_key_value_heads": 1}
    n_layer = config.get("num_hidden_layers") or config.get("n_layer")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper().replace("-", "_")], n_layer)
    tmp = Path(f"{path}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(Path(folder).name)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer.add_file_type(file_type)
    write_hyperparameters(writer, arch, config)
    write_tokenizer(writer, tok)
    for name, weight in llama_cpp_tensors(arch, config, weights):
        ours = names.get_name(name, try_suffixes=(".weight", ".bias"))
        check(ours is not None, f"{folder}'s tensor {name} has no place in llama.cpp's {arch}")
        add_tensor(writer, ours, weight, dtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {path}: llama.cpp's {arch}, {len(tok.merges)} merges, {dtype}")


def add_tensor(writer, name, weight, dtype):
    """One tensor; vectors (norms, biases) stay float32, as llama.cpp keeps them."""
    weight = weight.float()
    if weight.dim() == 1 or dtype == "f32":
        writer.add_tensor(name, weight.numpy())
    elif dtype == "f16":
        writer.add_tensor(name, weight.to(torch.float16).numpy())
    else:
        bf16 = gguf.GGMLQuantizationType.BF16
        data = gguf.quants.quantize(weight.numpy(), bf16)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=bf16)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported like every other bad input: one line, exit 1."""

    def error(self, message):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    parser.add_argument("folder", help="a folder that `MODEL.py export` wrote")
    parser.add_argument("gguf_file", help="the GGUF file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f32",
                        help="the matrices' number type (vectors stay f32)")
    args = parser.parse_args(argv)
    try:
        convert(args.folder, args.gguf_file, args.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
