"""Tests of bpe.py: the trainers, the tokenizer, the corpus, the command line."""

import doctest
import json
import os
import random
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
from conftest import one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpe

ROOT = Path(__file__).resolve().parent.parent

RUSSIAN = (
    "Поезд пришёл в город поздно вечером. На перроне было пусто, только старый "
    "носильщик курил у фонаря и смотрел на снег.\n"
    "— Вы к кому? — спросил он, не вынимая трубки изо рта.\n"
    "— К сестре, — ответила она. — Она живёт на Садовой улице, в доме номер 12.\n"
    "Он кивнул, взял чемодан и пошёл вперёд, не оглядываясь. Снег падал и падал, "
    "и фонари горели жёлтым светом, и где-то далеко лаяла собака.\r\n"
)
MIXED = (
    "Mixed scripts: English words, don't and we'll; 数字 and 漢字; emoji 🙂👍🏽; "
    "e\u0301 with a combining accent; tabs\tand  runs   of spaces; control \x00\x1b chars; "
    "числа 3.14159 и 2026 год.\n\n\n"
)
SAMPLE = RUSSIAN * 3 + MIXED


@pytest.fixture(scope="module")
def tok():
    return bpe.Tokenizer.train([SAMPLE], 400)


# -- the trainers ----------------------------------------------------------------


def test_reference_trainer_on_a_worked_example():
    # "aaab" x 1 and "ab" x 2: pairs (a,a):2, (a,b):3 -> merge (a,b) into 256 first; then
    # "aa256" ties (a,a):1 with (a,256):1 -> the smaller pair (a, a) wins; then (257, 256).
    a, b = ord("a"), ord("b")
    assert bpe.train_reference({"aaab": 1, "ab": 2}, 3) == [(a, b), (a, a), (257, 256)]


def test_docstring_examples():
    result = doctest.testmod(bpe)
    assert result.attempted >= 4 and result.failed == 0


def test_ties_go_to_the_smallest_pair():
    # Every pair occurs once: the smallest (first id, then second) wins.
    merges = bpe.train_reference({"dc": 1, "ba": 1, "bc": 1}, 1)
    assert merges == [(ord("b"), ord("a"))]
    assert bpe.train_fast({"dc": 1, "ba": 1, "bc": 1}, 1) == merges


small_corpora = st.dictionaries(
    st.text(alphabet="aab ёжЖ🙂", min_size=1, max_size=12), st.integers(1, 5), min_size=1, max_size=30
)


@settings(max_examples=150, deadline=None)
@given(chunk_counts=small_corpora, n_merges=st.integers(0, 40))
def test_fast_trainer_learns_the_reference_merges(chunk_counts, n_merges):
    assert bpe.train_fast(chunk_counts, n_merges) == bpe.train_reference(chunk_counts, n_merges)


@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.text(alphabet="абв гд.,\n", max_size=80), min_size=1, max_size=4),
       vocab_size=st.integers(257, 330))
def test_fast_and_reference_tokenizers_give_the_same_ids(texts, vocab_size):
    chunk_counts = bpe.count_chunks(texts)
    fast = bpe.Tokenizer.train(texts, vocab_size)
    reference = bpe.Tokenizer(bpe.train_reference(chunk_counts, vocab_size - 257))
    for text in texts:
        assert fast.encode(text) == reference.encode(text)


def test_training_compresses_and_stops_when_nothing_is_left_to_merge():
    tok = bpe.Tokenizer.train(["абв абв"], 1000)
    assert tok.vocab_size < 1000  # only a handful of distinct pairs exist
    assert len(tok.encode("абв абв")) == 2  # "абв" and " абв"


@pytest.mark.parametrize("vocab_size", [0, 256, 2**16 + 1])
def test_impossible_vocab_size_is_refused(vocab_size):
    with pytest.raises(ValueError, match="vocab_size must be between"):
        bpe.Tokenizer.train(["text"], vocab_size)


# -- encoding and decoding --------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "Привет, мир!", "数字と漢字", "🙂👍🏽👨‍👩‍👧", "e\u0301\u0302", "\x00\x01\x1b\x7f", "a\r\nb\r\n",
     "   \n\n\t  x  ", "<|endoftext|>", RUSSIAN, MIXED],
)
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids  # special tokens never come from ordinary text
    assert sum(tok.char_counts()[i] for i in ids) == len(text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decode_never_crashes_on_valid_ids(tok, data):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=50))
    assert isinstance(tok.decode(ids), str)  # broken UTF-8 becomes U+FFFD


def test_decode_stream_yields_whole_characters():
    tok = bpe.Tokenizer.train(["абв"], vocab_size=257)  # no merges: every Cyrillic letter takes two tokens
    text = "Привет, мир! Ёж."
    ids = list(text.encode("utf-8"))
    assert "\ufffd" in tok.decode(ids[:1])  # decoding token by token would break letters
    pieces = list(tok.decode_stream(ids))
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)
    assert "".join(tok.decode_stream(ids[:-2] + ids[-1:])) == tok.decode(ids[:-2] + ids[-1:])  # broken: U+FFFD


def test_merges_compress_the_training_text(tok):
    assert len(tok.encode(RUSSIAN)) < len(RUSSIAN.encode("utf-8")) / 3


def test_special_tokens(tok):
    assert tok.eot_id == tok.vocab_size - 1
    assert tok.decode([tok.eot_id]) == bpe.EOT
    assert tok.eot_id not in tok.encode(f"one{bpe.EOT}two")


@pytest.mark.parametrize("bad_id", [-1, 400, 10**9])
def test_out_of_range_id_is_a_clear_error(tok, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} is out of range"):
        tok.decode([1, bad_id])


def test_encoding_with_a_warm_cache_gives_the_same_ids(tok):
    first = tok.encode(SAMPLE)
    assert tok.encode(SAMPLE) == first
    fresh = bpe.Tokenizer(tok.merges)
    assert fresh.encode(SAMPLE) == first


# -- saving and loading ------------------------------------------------------------


def test_save_and_load_encode_identically(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = bpe.Tokenizer.load(path)
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.fingerprint == tok.fingerprint
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["vocab_size"] == tok.vocab_size == len(data["token2id"]) == len(data["id2token"])
    assert data["token2id"][bpe.EOT] == tok.eot_id
    assert {k: v for v, k in data["token2id"].items()} == {int(k): v for k, v in data["id2token"].items()}


def test_fingerprint_tells_tokenizers_apart_and_ignores_file_layout(tok, tmp_path):
    assert bpe.Tokenizer(tok.merges[:-1]).fingerprint != tok.fingerprint
    # The value every earlier bpe.py gave this tokenizer: a change would orphan saved runs.
    assert tok.fingerprint == "1dedc7a2b9226b0c5a3b9c9eeb0c434f50034cab1a2bc203931b07af316ce0dd"
    for layout in ({"indent": 4}, {"separators": (",", ":")}, {"ensure_ascii": True}):
        (tmp_path / "t.json").write_text(json.dumps(tok.to_dict(), **layout), encoding="utf-8")
        assert bpe.Tokenizer.load(tmp_path / "t.json").fingerprint == tok.fingerprint


def corrupt_merges(text):
    data = json.loads(text)
    data["merges"][5] = [1, 2]
    return json.dumps(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "truncated or corrupt"),
        (lambda text: "\xff\xfe garbage", "truncated or corrupt"),
        (corrupt_merges, "do not agree"),
        (lambda text: json.dumps({"model": {"type": "BPE"}, "version": "1.0"}), "not a tokenizer written by bpe.py"),
        (lambda text: "[1, 2, 3]", "not a tokenizer written by bpe.py"),
    ],
)
def test_bad_tokenizer_files_are_refused(tok, tmp_path, damage, message):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    path.write_text(damage(path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        bpe.Tokenizer.load(path)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        bpe.Tokenizer.load(tmp_path / "nope.json")


def test_gpt2_format_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    loaded = bpe.Tokenizer.from_pretrained(tmp_path)
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.special_tokens == tok.special_tokens


def test_gpt2_format_with_bytes_numbered_otherwise(tok, tmp_path):
    # GPT-2 does not give byte b the id b: renumber the bytes, keep the rest.
    shuffled = list(range(256))
    random.Random(0).shuffle(shuffled)
    new_id = {old: new for old, new in zip(range(256), shuffled)}
    piece = json.loads(json.dumps(tok.to_dict()))["id2token"]
    vocab = {p: new_id.get(int(i), int(i)) for i, p in piece.items()}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = [f"{piece[str(a)]} {piece[str(b)]}" for a, b in tok.merges]
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    loaded = bpe.Tokenizer.from_pretrained(tmp_path)
    assert loaded.encode(SAMPLE) == [new_id.get(i, i) for i in tok.encode(SAMPLE)]
    assert loaded.decode(loaded.encode(SAMPLE)) == SAMPLE
    assert loaded.eot_id == tok.eot_id


@pytest.mark.parametrize(
    "vocab, merges, message",
    [
        (None, "a b\n", "lacks vocab.json"),
        ({"a": 0}, None, "lacks merges.txt"),
        ("[1, 2", "", "is not GPT-2's"),
        ([1, 2], "", "holds no GPT-2 tokenizer"),
        ({"a": 97, "b": 98}, "a b c\n", "holds no GPT-2 tokenizer"),
        ({"a": 97, "b": 98}, "a z\n", "names 'z', which vocab.json lacks"),
    ],
)
def test_bad_gpt2_files(tmp_path, vocab, merges, message):
    if vocab is not None:
        text = vocab if isinstance(vocab, str) else json.dumps(vocab)
        (tmp_path / "vocab.json").write_text(text, encoding="utf-8")
    if merges is not None:
        (tmp_path / "merges.txt").write_text(merges, encoding="utf-8")
    with pytest.raises((ValueError, OSError), match=message):
        bpe.Tokenizer.from_pretrained(tmp_path)


# -- the corpus --------------------------------------------------------------------


def write_corpus(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return folder


NOVELS = {f"novel_{i}.txt": f"Глава {i}.\r\n" + RUSSIAN * (i + 1) for i in range(6)}


def test_read_corpus_normalises_and_drops_duplicates(tmp_path):
    folder = write_corpus(tmp_path / "c", {**NOVELS, "z_copy_of_novel_2.txt": NOVELS["novel_2.txt"], "notes.md": "x"})
    docs = bpe.read_corpus(folder)
    assert [name for name, _ in docs] == sorted(NOVELS)
    assert all("\r" not in text for _, text in docs)


def test_split_is_by_whole_novel_and_ignores_listing_order():
    docs = [(f"n{i}.txt", f"text {i}") for i in range(40)]
    train, val = bpe.split_corpus(docs)
    assert len(val) == 2 and len(train) == 38
    assert not {n for n, _ in train} & {n for n, _ in val}
    assert bpe.split_corpus(docs[::-1]) == (train, val)
    assert len(bpe.split_corpus(docs[:2])[1]) == 1


def test_one_text_splits_at_the_line_that_holds_the_90_percent_mark(tmp_path):
    lines = [f"строка {i:02}\n" for i in range(20)]  # 20 lines of 10 characters
    folder = write_corpus(tmp_path / "folder", {"a.txt": "".join(lines)})
    for data in (folder, folder / "a.txt"):  # a folder of one file, or the file
        (train,), (val,) = bpe.split_corpus(bpe.read_corpus(data))
        assert train == ("a.txt", "".join(lines[:18])) and val == ("a.txt from line 19", "".join(lines[18:]))
    one_line = "слово " * 100
    (train,), (val,) = bpe.split_corpus([("b.txt", one_line)])
    assert train[1] + val[1] == one_line and len(val[1]) == 60


def test_a_byte_order_mark_is_not_text(tmp_path):
    write_corpus(tmp_path / "c", {"a.txt": "\ufeffПервая глава.\r\n", "b.txt": "Первая глава.\n"})
    assert bpe.read_text(tmp_path / "c" / "a.txt") == "Первая глава.\n"
    assert len(bpe.read_corpus(tmp_path / "c")) == 1  # the same novel, saved by Notepad and by anything else
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf \n")
    with pytest.raises(ValueError, match="is empty"):
        bpe.read_text(tmp_path / "bom.txt")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "no corpus at .*data/download.py.*--data DIR"),
        (lambda d: write_corpus(d / "empty", {}), r"no corpus at .*empty \(no .txt file\)"),
        (lambda d: write_corpus(d / "latin1", {"a.txt": "ok", "b.txt": "Привет".encode("cp1251")}), "b.txt is not UTF-8"),
        (lambda d: write_corpus(d / "blank", {"a.txt": "ok", "b.txt": " \n"}), "b.txt is empty"),
    ],
)
def test_bad_corpus_gives_a_clear_error(tmp_path, make, message):
    with pytest.raises((ValueError, OSError), match=message):
        bpe.split_corpus(bpe.read_corpus(make(tmp_path)))


def read_ids(path):
    ids = array("H", Path(path).read_bytes())
    if sys.byteorder == "big":
        ids.byteswap()
    return list(ids)


def test_prepare_corpus_writes_token_arrays_and_reuses_them(tmp_path):
    data = write_corpus(tmp_path / "c", NOVELS)
    tok, train_path, val_path = bpe.prepare_corpus(data, tmp_path / "out", 300, log=lambda *_: None)
    assert tok.vocab_size == 300 and (tmp_path / "out" / "tokenizer.json").exists()
    train_docs, val_docs = bpe.split_corpus(bpe.read_corpus(data))
    for path, docs in ((train_path, train_docs), (val_path, val_docs)):
        ids = read_ids(path)
        assert ids.count(tok.eot_id) == len(docs) and ids[0] == tok.eot_id
        assert tok.decode(ids) == "".join(bpe.EOT + text for _, text in docs)
    mtime = train_path.stat().st_mtime_ns
    for vocab_size in (None, 300):  # None: fine-tuning, which uses the tokenizer there
        again, train_again, _ = bpe.prepare_corpus(data, tmp_path / "out", vocab_size, log=lambda *_: None)
        assert again.fingerprint == tok.fingerprint and train_again.stat().st_mtime_ns == mtime


def test_parallel_work_equals_serial(tok, monkeypatch):
    texts = [SAMPLE * 3, RUSSIAN, MIXED * 2]
    serial_ids, serial_counts = list(bpe.parallel_map(tok.encode, texts)), bpe.count_chunks(texts)
    assert set(bpe.parallel_map(lambda _: os.getpid(), texts)) == {os.getpid()}  # small: done here
    monkeypatch.setattr(bpe, "PARALLEL_MIN_CHARS", 0)
    pids = set(bpe.parallel_map(lambda _: os.getpid(), texts))
    assert len(pids) <= min(3, os.cpu_count())  # at most a worker per text and per core
    assert os.getpid() not in pids or os.cpu_count() == 1
    assert list(bpe.parallel_map(tok.encode, texts)) == serial_ids
    assert bpe.count_chunks(texts) == serial_counts


# -- the command line --------------------------------------------------------------


def run_bpe(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "bpe.py"), *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", env=env)


def test_command_line_train_encode_decode(tmp_path):
    data = write_corpus(tmp_path / "c", NOVELS)
    out = tmp_path / "tok.json"
    trained = run_bpe("train", "--vocab-size", 300, "--data", data, "--out", out)
    assert trained.returncode == 0, trained.stderr
    assert "vocabulary 300" in trained.stdout and "characters per token" in trained.stdout
    encoded = run_bpe("encode", "--tokenizer", out, "Снег падал")
    assert encoded.returncode == 0, encoded.stderr
    ids = encoded.stdout.splitlines()[0].split()
    assert "   208  '\\xd0'\n" in encoded.stdout  # half of "С": a byte, not a character
    assert " 'н'\n" in encoded.stdout
    decoded = run_bpe("decode", "--tokenizer", out, *ids)
    assert decoded.stdout == "Снег падал\n"


@pytest.mark.parametrize("console", ["cp1252", "cp1251", "ascii"])
def test_encode_and_decode_write_utf8_to_any_console(tok, tmp_path, console):
    """As Windows encodes a redirected stdout in its ANSI code page: UTF-8 still comes out."""
    tok.save(tmp_path / "tok.json")
    env = {**os.environ, "PYTHONIOENCODING": console}
    encoded = run_bpe("encode", "--tokenizer", tmp_path / "tok.json", "Ёлка, café", env=env)
    assert encoded.returncode == 0 and " 'л'\n" in encoded.stdout, encoded.stderr
    ids = encoded.stdout.splitlines()[0].split()
    decoded = run_bpe("decode", "--tokenizer", tmp_path / "tok.json", *ids, env=env)
    assert decoded.returncode == 0 and decoded.stdout == "Ёлка, café\n", decoded.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/t.json"], "error: no corpus at"),
        (["encode", "--tokenizer", "{tmp}/missing.json", "x"], "error: no tokenizer at"),
        (["decode", "--tokenizer", "{tok}", "999999"], "error: token id 999999 is out of range"),
        (["train", "--vocab-size", "10", "--data", "{data}", "--out", "{tmp}/t.json"], "error: vocab_size must be"),
        (["train", "--data", "{data}", "--out", "{tmp}/run/tokenizer.json"], "error: {tmp}/run/tokenizer.json is a run's"),
    ],
)
def test_command_line_errors_are_one_line(tok, tmp_path, args, message):
    tok.save(tmp_path / "tok.json")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"a run's checkpoint, trained with its tokenizer.json")
    message = message.format(tmp=tmp_path)
    data = write_corpus(tmp_path / "c", {"a.txt": "один", "b.txt": "два"})
    args = [a.format(tmp=tmp_path, tok=tmp_path / "tok.json", data=data) for a in args]
    result = run_bpe(*args)
    assert result.returncode == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


# -- what a new user hits ------------------------------------------------------------


def prepare(data, out_dir, vocab_size, resume=False):
    """prepare_corpus, with what it logged: (tokenizer, log lines)."""
    lines = []
    tok, _, _ = bpe.prepare_corpus(data, out_dir, vocab_size, log=lines.append, resume=resume)
    return tok, lines


def trained_here(lines):
    return any(line.startswith("training a ") for line in lines)


def test_a_tokenizer_left_by_a_run_on_other_data_is_not_reused(tmp_path):
    tiny = write_corpus(tmp_path / "tiny", {"a.txt": "Мама мыла раму."})
    novels = write_corpus(tmp_path / "novels", NOVELS)
    out = tmp_path / "out"
    left, _ = prepare(tiny / "a.txt", out, 300)  # a failed run's: BPE stops early on 15 characters
    assert left.vocab_size < 300
    # A resumed run depends on its tokenizer: refuse, naming both sizes.
    with pytest.raises(ValueError, match=rf"\({left.vocab_size} tokens for --vocab-size 300\) was "
                                         rf"not made from this --data for --vocab-size 300"):
        prepare(novels, out, 300, resume=True)
    tok, lines = prepare(novels, out, 300)  # a new run: train anew, and say why
    assert tok.vocab_size == 300 and trained_here(lines)
    assert any("was made for other data or another --vocab-size" in line for line in lines)
    assert bpe.Tokenizer.load(out / "tokenizer.json").fingerprint == tok.fingerprint
    with pytest.raises(ValueError, match=r"\(300 tokens for --vocab-size 300\) .* --vocab-size 500"):
        prepare(novels, out, 500, resume=True)


def test_a_tokenizer_made_here_for_the_same_texts_and_size_is_reused(tmp_path):
    tiny = write_corpus(tmp_path / "tiny", {"a.txt": "Мама мыла раму. " * 20})
    first, lines = prepare(tiny, tmp_path / "out", 2000)  # stops early: its size is below the request
    assert first.vocab_size < 2000 and trained_here(lines)
    for resume in (False, True):
        again, lines = prepare(tiny, tmp_path / "out", 2000, resume=resume)
        assert again.fingerprint == first.fingerprint and not trained_here(lines)


def test_a_tokenizer_without_its_record_is_not_reused(tmp_path, monkeypatch):
    """A run that dies between tokenizer.json and its record leaves nothing a resume takes for its own."""
    novels = write_corpus(tmp_path / "novels", NOVELS)
    prepare(novels, tmp_path / "out", 280)
    real_save = bpe.Tokenizer.save

    def save_then_die(tok, path):
        real_save(tok, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(bpe.Tokenizer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(novels, tmp_path / "out", 300)
    monkeypatch.undo()
    # The record still says "these novels, 280", but of the tokenizer before.
    with pytest.raises(ValueError, match=r"\(300 tokens for --vocab-size 280\)"):
        prepare(novels, tmp_path / "out", 280, resume=True)
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix == ".tmp"]


def test_fine_tuning_needs_a_tokenizer_in_out_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*tokenizer.json"):
        prepare(write_corpus(tmp_path / "c", NOVELS), tmp_path / "out", None)


words = st.text(alphabet=st.characters(blacklist_categories=["Z", "Cc"]), min_size=1, max_size=400)
separators = st.sampled_from([" ", "\n", ". ", "! ", "? ", "… ", "\n\n", ", "])
texts = st.lists(st.tuples(words, separators), min_size=1).map(lambda parts: "".join(w + s for w, s in parts))


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(texts, st.text(min_size=1, max_size=2000)).filter(lambda text: len(text) >= 100))
def test_one_text_keeps_about_90_percent_for_training(text):
    try:
        (train,), (val,) = bpe.split_corpus([("story.txt", text)])
    except ValueError as e:  # arbitrary text: the last 10% may be blank
        assert str(e) == "story.txt is too short to split into training and validation text"
        assert not text[: len(text) * 88 // 100].strip() or not text[len(text) * 9 // 10 :].strip()
        return
    assert train[0] == "story.txt" and val[0] == f"story.txt from line {train[1].count(chr(10)) + 1}"
    assert train[1] + val[1] == text and 0.85 <= len(train[1]) / len(text) <= 0.95


def test_one_text_of_a_title_and_a_one_line_book_splits_inside_the_book():
    book = "Война и мир\n" + " ".join(RUSSIAN.split() * 40)  # a title, then the whole book as one line
    (train,), (val,) = bpe.split_corpus([("book.txt", book)])
    assert 0.88 <= len(train[1]) / len(book) <= 0.9 and val[0] == "book.txt from line 2"
    assert train[1].endswith(". ") or train[1].endswith("! ")  # at a sentence end


@pytest.mark.parametrize("text", ["x", "x" + " " * 50])
def test_a_text_that_cannot_split_is_one_clear_error(tmp_path, text):
    with pytest.raises(ValueError, match="a.txt is too short to split into training and validation text"):
        bpe.split_corpus([("a.txt", text)])
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    result = run_bpe("train", "--vocab-size", 300, "--data", tmp_path / "a.txt", "--out", tmp_path / "t.json")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "too short to split" in result.stderr


def test_txt_files_in_any_case_are_read_and_counted(tmp_path):
    data = write_corpus(tmp_path / "c", {"a.txt": RUSSIAN, "b.TXT": MIXED, "c.Txt": SAMPLE, "d.md": "x"})
    assert [name for name, _ in bpe.read_corpus(data)] == ["a.txt", "b.TXT", "c.Txt"]
    _, lines = prepare(data, tmp_path / "out", 300)
    assert lines[0].startswith(f"read 3 texts from {data}; validation split: ")


def test_writing_over_a_folder_names_it_and_leaves_no_temp_file(tmp_path, tok):
    folder = tmp_path / "tok"
    folder.mkdir()
    with pytest.raises(OSError, match=f"^cannot write {folder}: "):
        tok.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    data = write_corpus(tmp_path / "c", NOVELS)
    result = run_bpe("train", "--vocab-size", 300, "--data", data, "--out", folder)
    assert result.returncode == 1 and result.stderr == f"error: cannot write {folder}: Is a directory\n"
    assert not (tmp_path / "tok.tmp").exists()


def test_encode_reads_a_file_or_stdin(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    (tmp_path / "text.txt").write_text(RUSSIAN, encoding="utf-8")
    expected = " ".join(map(str, tok.encode(RUSSIAN.replace("\r\n", "\n")))) + "\n"  # read as the corpus is
    runs = [run_bpe("encode", "--tokenizer", tmp_path / "tok.json", "--file", tmp_path / "text.txt")]
    for args in ([], ["-"]):
        runs.append(subprocess.run([sys.executable, str(ROOT / "bpe.py"), "encode", "--tokenizer",
                                    str(tmp_path / "tok.json"), *args], input=RUSSIAN.replace("\r\n", "\n"),
                                   capture_output=True, encoding="utf-8"))
    for run in runs:
        assert run.returncode == 0 and run.stdout.startswith(expected), run.stderr
    assert "stdin" in run_bpe("encode", "--help").stdout
    both = run_bpe("encode", "--tokenizer", tmp_path / "tok.json", "--file", tmp_path / "text.txt", "text")
    assert one_line_error(both.returncode, both.stderr, "not allowed with")


def test_an_abbreviated_flag_is_an_error(tmp_path):
    data = write_corpus(tmp_path / "c", NOVELS)
    result = run_bpe("train", "--vocab", 300, "--data", data, "--out", tmp_path / "t.json")
    assert one_line_error(result.returncode, result.stderr, "unrecognized arguments: --vocab")
    assert not (tmp_path / "t.json").exists()


def test_a_closed_pipe_ends_quietly(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    (tmp_path / "long.txt").write_text(SAMPLE * 300, encoding="utf-8")  # ~1 MB of output, past a pipe's buffer
    command = [sys.executable, str(ROOT / "bpe.py"), "encode", "--tokenizer", tmp_path / "tok.json",
               "--file", tmp_path / "long.txt"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert len(process.stdout.read(5)) == 5
        process.stdout.close()  # as `| head -c 5` does
        err = process.stderr.read()
    assert process.returncode in (0, -13, 141) and err == b""  # -13: ended by SIGPIPE


def test_token_arrays_whose_record_was_never_written_are_not_reused(tok, tmp_path, monkeypatch):
    path = tmp_path / "train.bin"
    first = [("a.txt", RUSSIAN)]
    bpe.encode_corpus(tok, first, path, log=lambda *_: None)
    real_write = bpe.write_atomically

    def die_before_the_record(target, data):
        if Path(target).suffix == ".json":
            raise KeyboardInterrupt
        real_write(target, data)

    monkeypatch.setattr(bpe, "write_atomically", die_before_the_record)
    with pytest.raises(KeyboardInterrupt):
        bpe.encode_corpus(tok, [("b.txt", MIXED)], path, log=lambda *_: None)
    monkeypatch.undo()
    bpe.encode_corpus(tok, first, path, log=lambda *_: None)
    assert tok.decode(read_ids(path)) == bpe.EOT + RUSSIAN


def test_a_truncated_token_array_is_made_again(tok, tmp_path):
    """A copy cut short keeps its record; the array's size in the record gives it away."""
    path = tmp_path / "train.bin"
    docs = [("a.txt", RUSSIAN)]
    bpe.encode_corpus(tok, docs, path, log=lambda *_: None)
    path.write_bytes(path.read_bytes()[:10])
    lines = []
    bpe.encode_corpus(tok, docs, path, log=lines.append)
    assert lines and tok.decode(read_ids(path)) == bpe.EOT + RUSSIAN


def test_a_damaged_record_of_a_token_array_makes_it_again(tok, tmp_path):
    path = tmp_path / "train.bin"
    docs = [("a.txt", RUSSIAN)]
    bpe.encode_corpus(tok, docs, path, log=lambda *_: None)
    path.with_suffix(".json").write_text('{"tokenizer": ', encoding="utf-8")
    lines = []
    bpe.encode_corpus(tok, docs, path, log=lines.append)
    assert lines and tok.decode(read_ids(path)) == bpe.EOT + RUSSIAN


def test_a_folder_given_for_a_text_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a text file"):
        bpe.read_text(tmp_path)
    (tmp_path / "a.txt").write_text("a text, not a model's folder", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="no such file"):
        bpe.read_json(tmp_path / "a.txt" / "config.json")
