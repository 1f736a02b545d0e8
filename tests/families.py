"""The tokenizer.json of each released family's kind, built here with `tokenizers` (and,
for SentencePiece's kind, from a model trained with `sentencepiece`) on small texts, and
saved as a Hugging Face folder: tokenizer.json and tokenizer_config.json. Nothing is
downloaded; the forms follow the files the families publish."""

import io
import json

import pytest

TEXTS = [
    "Мой дядя самых честных правил, когда не в шутку занемог, он уважать себя заставил.",
    "Hello world, hello  there!\tTabs\nnew line 1234567 😀 中文 don't  I'll",
    "  Два пробела, и ещё   три. Ёлка — ёж; «кавычки» 2024 год.",
] * 30
# Llama 3's split (Qwen's differs in digits: one at a time).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# o200k's (gpt-oss): words by case, contractions attached.
UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
O200K_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+{CONTRACTION}"
               rf"|[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*{CONTRACTION}"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# form: (beginning-of-text token or None, end-of-text token)
BYTE_LEVEL = {
    "gpt2": (None, "<|endoftext|>"),  # ByteLevel alone
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>"),  # Split, then ByteLevel without its regex
    "qwen": (None, "<|endoftext|>"),  # NFC first
    "smollm": (None, "<|endoftext|>"),  # single digits, then ByteLevel with its regex
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),  # three Splits
    "o200k": (None, "<|return|>"),  # gpt-oss's
}
SENTENCEPIECE = {
    "llama2": ("<s>", "</s>"),  # Prepend + Replace normalizer, no pre-tokenizer
    "metaspace": ("<s>", "</s>"),  # transformers 5's Metaspace pre-tokenizer
    "metaspace_split": ("<s>", "</s>"),  # Metaspace that cuts before each "▁"
    "gemma": ("<bos>", "<eos>"),  # Replace normalizer, Split(" ") pre-tokenizer, no prefix
    "crossing": ("<s>", "</s>"),  # llama2 with a merge that crosses a word's start: ",▁"
}
FORMS = [*BYTE_LEVEL, *SENTENCEPIECE]


def byte_level(form):
    """A byte-level BPE of 400 tokens in the form of the family `form`."""
    tk = pytest.importorskip("tokenizers")
    pre = tk.pre_tokenizers
    steps = {
        "gpt2": [],
        "llama3": [pre.Split(tk.Regex(LLAMA3_SPLIT), "isolated")],
        "qwen": [pre.Split(tk.Regex(QWEN_SPLIT), "isolated")],
        "smollm": [pre.Digits(individual_digits=True)],
        "deepseek": [pre.Split(tk.Regex(r"\p{N}{1,3}"), "isolated"),
                     pre.Split(tk.Regex(r"[一-龥぀-ゟ゠-ヿ]+"), "isolated"),
                     pre.Split(tk.Regex(LLAMA3_SPLIT), "isolated")],
        "o200k": [pre.Split(tk.Regex(O200K_SPLIT), "isolated")],
    }[form]
    tok = tk.Tokenizer(tk.models.BPE(ignore_merges=form == "llama3"))
    last = pre.ByteLevel(add_prefix_space=False, use_regex=form in ("gpt2", "smollm"))
    tok.pre_tokenizer = pre.Sequence(steps + [last]) if steps else last
    if form == "qwen":
        tok.normalizer = tk.normalizers.NFC()
    tok.decoder = tk.decoders.ByteLevel()
    specials = [name for name in BYTE_LEVEL[form] if name]
    trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                     initial_alphabet=pre.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    bos = BYTE_LEVEL[form][0]
    tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    if bos:
        tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def sentencepiece_pieces(prefix, texts=TEXTS, vocab_size=420):
    """The pieces ({piece: id}) and merges of a SentencePiece BPE trained on texts (with
    byte fallback), the merges ranked as transformers' converter ranks them: by the score
    of the piece they make."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=prefix, minloglevel=3)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {sp.id_to_piece(i): (-sp.get_score(i), i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    ranked = sorted((normal[p], p[:k], p[k:]) for p in normal for k in range(1, len(p))
                    if p[:k] in normal and p[k:] in normal)
    return pieces, [(a, b) for _, a, b in ranked]


def sentencepiece(form, texts=TEXTS, vocab_size=420):
    """A SentencePiece BPE in the form of the family `form`, trained on texts."""
    tk = pytest.importorskip("tokenizers")
    pieces, merges = sentencepiece_pieces(form != "gemma", texts, vocab_size)
    bos, eos = SENTENCEPIECE[form]
    if form == "gemma":  # Gemma's special tokens: <pad> <eos> <bos> <unk>
        names = {"<unk>": "<pad>", "<s>": "<eos>", "</s>": "<bos>"}
        pieces = {names.get(p, p): id for p, id in pieces.items()}
        pieces["<unk>"] = len(pieces)
    if form == "crossing":
        pieces[",▁"] = len(pieces)
        merges.append((",", "▁"))
    tok = tk.Tokenizer(tk.models.BPE(vocab=pieces, merges=merges, unk_token="<unk>",
                                     byte_fallback=True, fuse_unk=True))
    replace = tk.normalizers.Replace(" ", "▁")
    if form in ("llama2", "crossing"):
        tok.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("▁"), replace])
    elif form == "gemma":
        tok.normalizer = replace
        tok.pre_tokenizer = tk.pre_tokenizers.Split(" ", "merged_with_previous")
    else:
        tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=form == "metaspace_split")
    decoders = [tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if form != "gemma":
        decoders.append(tk.decoders.Strip(" ", 1, 0))
    tok.decoder = tk.decoders.Sequence(decoders)
    tok.add_special_tokens([name for name in pieces if name.startswith("<") and name.endswith(">")
                            and not name.startswith("<0x")])
    tok.post_processor = tk.processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, pieces[bos])])
    return tok


def reference(form):
    """The `tokenizers` Tokenizer of `form`, reading special-token names in text as text."""
    tok = byte_level(form) if form in BYTE_LEVEL else sentencepiece(form)
    tok.encode_special_tokens = True
    return tok


def save_folder(form, folder):
    """A Hugging Face folder with the tokenizer of `form`: tokenizer.json, and
    tokenizer_config.json naming its special tokens as the families' do."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = reference(form)
    tok.save(str(folder / "tokenizer.json"))
    bos, eos = {**BYTE_LEVEL, **SENTENCEPIECE}[form]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "add_bos_token": bos is not None, "split_special_tokens": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tok
