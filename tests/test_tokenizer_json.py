"""bpe.py reading the tokenizers that released models ship as tokenizer.json, in each
form the families use (tests/families.py): ids equal to those of the `tokenizers`
library reading the same file, on any text; decoding equal to its decoding; the
beginning- and end-of-text tokens that transformers' AutoTokenizer uses; anything else
refused in one line; and bpe.py writing our own tokenizer as such a file."""

import functools
import json
import subprocess
import sys

import families
import pytest
from conftest import ROOT, SENTENCES, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpe

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

# Text that tokenizers get wrong: spaces, tabs and newlines in runs, combining marks,
# emoji, CJK, the SentencePiece space "▁" itself, special-token names, digits.
TRICKY = st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\r\n", "\u0301", "e\u0301", "😀", "👍🏽",
                                  "中文", "日本", "▁", "<s>", "</s>", "<|endoftext|>", "'s", "'LL",
                                  "123", "4567", "ﬁ", "Å", "\x00", "\u200b", "а", "Ёж", "x"])).map("".join)
ANY_TEXT = st.one_of(st.text(), TRICKY, st.sampled_from(["", " ", *SENTENCES]))
CASES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=families.FORMS)
def form(request, tmp_path_factory):
    """(name, our Tokenizer read from the folder, the `tokenizers` reference, the folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = families.save_folder(request.param, folder)
    return request.param, bpe.Tokenizer.from_pretrained(folder), reference, folder


@CASES
@given(text=ANY_TEXT)
def test_ids_and_text_equal_the_tokenizers_library(form, text):
    name, tok, reference, _ = form
    expected = reference.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == expected
    assert tok.decode(expected) == reference.decode(expected, skip_special_tokens=False)
    if name in families.BYTE_LEVEL and name != "qwen":  # NFC changes the text, as in the reference
        assert tok.decode(tok.encode(text)) == text


@CASES
@given(data=st.data())
def test_any_ids_decode_as_the_tokenizers_library_decodes_them(form, data):
    """Byte pieces that make no character, special tokens mid-text, a leading space."""
    _, tok, reference, _ = form
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=12))
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    # Streamed, a continuation: it keeps the space that decoding drops at a text's start.
    streamed = "".join(tok.decode_stream(ids))
    if getattr(tok, "prefix", None):
        streamed = streamed.removeprefix(" ")
    assert streamed == tok.decode(ids)


def test_the_kind_of_each_form(form):
    name, tok, _, _ = form
    kind = bpe.SentencePieceBPE if name in families.SENTENCEPIECE else bpe.Tokenizer
    assert type(tok) is kind
    # Cut into words where no merge crosses a "▁", one text where one does.
    assert bool(getattr(tok, "_compiled", [1])) == (name != "crossing")


def test_a_prompt_starts_as_autotokenizer_starts_it(form):
    name, tok, _, folder = form
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ["Мой дядя", " два  пробела", "<s> и <|endoftext|> как текст"]:
        assert tok.encode_prompt(text) == hf(text).input_ids
    bos, eos = {**families.BYTE_LEVEL, **families.SENTENCEPIECE}[name]
    assert tok.add_bos == (bos is not None)
    assert tok.eos_id == hf.convert_tokens_to_ids(eos)


def test_long_text_without_a_space_encodes_in_linear_time(form):
    """200,000 letters with no space are one chunk: the heap's merges, not a scan per merge."""
    _, tok, reference, _ = form
    text = "".join(SENTENCES).replace(" ", "")[:2000] * 100
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids


def edit(folder, **changes):
    data = json.loads((folder / "tokenizer.json").read_text("utf-8"))
    for key, value in changes.items():
        if key.startswith("model_") and isinstance(data["model"], dict):
            data["model"][key.removeprefix("model_")] = value
        else:
            data[key] = value
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.parametrize("form, changes, named", [
    ("gpt2", dict(model_type="WordPiece"), "WordPiece"),
    ("gpt2", dict(model_type="Unigram"), "Unigram"),
    ("gpt2", dict(model_dropout=0.1), "dropout"),
    ("gpt2", dict(normalizer={"type": "Lowercase"}), "Lowercase"),
    ("gpt2", dict(pre_tokenizer={"type": "Whitespace"}), "Whitespace"),
    ("gpt2", dict(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}), "add_prefix_space"),
    ("gpt2", dict(decoder={"type": "WordPiece"}), "decoder"),
    ("llama2", dict(normalizer={"type": "NFKC"}), "NFKC"),
    ("llama2", dict(decoder=None), "decoder"),
    ("gpt2", dict(model_merges=[["Ġ", "nowhere"]]), "corrupt"),
    ("gpt2", dict(model=[1]), "corrupt"),
    ("llama2", dict(post_processor={"type": "TemplateProcessing", "single": [], "pair": [],
                                    "special_tokens": {}}), "corrupt"),
])
def test_what_bpe_py_does_not_compute_is_refused_by_name(form, changes, named, tmp_path):
    families.save_folder(form, tmp_path)
    edit(tmp_path, **changes)
    with pytest.raises(ValueError, match=named):
        bpe.Tokenizer.from_pretrained(tmp_path)


def test_bpe_py_encodes_with_a_folder_and_refuses_a_bad_one_in_one_line(tmp_path):
    families.save_folder("llama2", tmp_path / "good")
    run = [sys.executable, str(ROOT / "bpe.py"), "encode", "--tokenizer"]
    result = subprocess.run([*run, tmp_path / "good", "Мой дядя"], capture_output=True, encoding="utf-8")
    ids = bpe.Tokenizer.from_pretrained(tmp_path / "good").encode("Мой дядя")
    assert result.returncode == 0 and result.stdout.splitlines()[0] == " ".join(map(str, ids))
    families.save_folder("gpt2", tmp_path / "bad")
    edit(tmp_path / "bad", model_type="Unigram")
    result = subprocess.run([*run, tmp_path / "bad", "x"], capture_output=True, encoding="utf-8")
    assert one_line_error(result.returncode, result.stderr, "Unigram"), result.stderr


# -----------------------------------------------------------------------------
# Ours, written as tokenizer.json


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    tok = bpe.Tokenizer.train(SENTENCES * 3, 400)
    folder = tmp_path_factory.mktemp("ours")
    tok.save_pretrained(folder)
    return tok, folder


@CASES
@given(text=ANY_TEXT)
def test_our_tokenizer_json_gives_our_ids_in_tokenizers_and_transformers(ours, text):
    tok, folder = ours
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference.encode_special_tokens = True
    assert reference.encode(text, add_special_tokens=False).ids == tok.encode(text)
    hf = auto_tokenizer(folder)
    assert hf(text).input_ids == tok.encode_prompt(text)  # <|endoftext|> first
    assert hf.decode(tok.encode(text)) == text


@functools.cache
def auto_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_our_tokenizer_json_reads_back_as_the_same_tokenizer(ours):
    tok, folder = ours
    back = bpe.Tokenizer.from_pretrained(folder)
    assert back.fingerprint == tok.fingerprint
    assert (back.bos_id, back.add_bos, back.eos_id) == (tok.eot_id, True, tok.eot_id)
    (folder / "tokenizer.json").rename(folder / "hidden.json")  # vocab.json + merges.txt alone
    try:
        assert bpe.Tokenizer.from_pretrained(folder).fingerprint == tok.fingerprint
    finally:
        (folder / "hidden.json").rename(folder / "tokenizer.json")
