import pickle

import pytest

from data import ByteTokenizer, check_vocab, load_tokenizer
from data.config import REPO_ROOT
from data.tokenizer.train import main as train_main
from _data_helpers import write_jsonl

TRICKY = [
    "", "a", " leading", "trailing  ", "  two  spaces   three", "line\nbreak\n\nparagraph\n", "\r\n\tTabs\t\t",
    "x" * 3000, "12345678901234567890", "café naïve Ωμέγα 中文字符 日本語", "emoji 🤖👍🏽 ZWJ 👨\u200d👩\u200d👧",
    "\ufffd\uffff\ufeff\u0000\u202e bidi", "combining e\u0301 a\u0308", "<s></s><unk><pad> ▁ <0x41>",
]


def test_bundled_tokenizer_round_trip_and_ids():
    tok = load_tokenizer("data/corpus/tokenizer.model")
    assert tok.vocab_size == 4096 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for s in TRICKY:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, s
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids and tok.eos_id not in ids  # control pieces never come from text
    assert len(tok.encode("The history of the United States")) < 12  # it learned real pieces, not just bytes


def test_train_cli_lossless_and_picklable(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", ["Hello world.\n  Indented\tline.", "Numbers 2024 and 42."] * 50,
                      extra_lines=["{broken"])
    out = tmp_path / "tok.model"
    train_main(["train", "--input", str(tmp_path / "*.jsonl"), "--text-field", "text", "--vocab-size", "300",
                "--output", str(out)])
    tok = load_tokenizer(str(out))
    tok2 = pickle.loads(pickle.dumps(tok))
    for s in TRICKY:
        assert tok.decode(tok.encode(s)) == s
        assert tok2.encode(s) == tok.encode(s)
    assert [tok._sp.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]  # split digits


def test_lone_surrogate_is_replaced_not_fatal():
    tok = load_tokenizer("byte")
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    spm = load_tokenizer(str(REPO_ROOT / "data/corpus/tokenizer.model"))
    assert spm.decode(spm.encode("a\ud800b")) == "a\ufffdb"


def test_byte_tokenizer_and_vocab_check():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("é\n🤖")) == "é\n🤖"
    check_vocab(tok, 259)
    with pytest.raises(ValueError, match="model.vocab_size"):
        check_vocab(tok, 258)


def test_missing_tokenizer_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(str(tmp_path / "nope.model"))
