"""Tokenizers: GPT-2's real vocabulary offline, trained byte-level BPEs, saving and loading."""

import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caracal_cli.tokenizer import (EOT, REFERENCE_FILE, TOKENIZER_FILE, TokenizerError, gpt2, load_tokenizer,
                                   train_bpe)

CORPUS = [
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n",
    "And by opposing end them? To die: to sleep;\nNo more; and by a sleep to say we end\n",
    "Numbers 1234 and 56, punctuation!? and   spaces\n\n\tand tabs; café, naïve, 東京.\n",
] * 20


def test_gpt2_known_ids():
    tok = gpt2()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    text = "Hello world, café 東京!\n\n  x"
    assert tok.decode(tok.encode(text)) == text


def test_literal_end_of_text_stays_text():
    for tok in (gpt2(), train_bpe(CORPUS, 300)):
        ids = tok.encode(f"a {EOT} b")
        assert tok.eot_id not in ids
        assert tok.decode(ids) == f"a {EOT} b"


def test_encode_arrays_match_encode():
    for tok in (gpt2(), train_bpe(CORPUS, 300)):
        arrays = tok.encode_arrays(CORPUS[:4] + [f"x{EOT}y", ""])
        assert all(a.dtype == np.uint32 for a in arrays)
        assert [a.tolist() for a in arrays] == [tok.encode(t) for t in CORPUS[:4] + [f"x{EOT}y", ""]]


def _train_hash() -> str:
    return hashlib.sha256(train_bpe(CORPUS, 320).to_json().encode()).hexdigest()


def test_trained_bpe_is_deterministic_across_processes():
    tok = train_bpe(CORPUS, 320)
    assert tok.vocab_size == 320 and tok.eot_id == 0 and tok.name == "bpe-320"
    assert tok.decode(tok.encode(CORPUS[3])) == CORPUS[3]
    here = _train_hash()
    assert _train_hash() == here
    code = "from tests.test_tokenizer import _train_hash; print(_train_hash())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parent.parent)
    assert other.stdout.strip() == here


def test_save_and_load_keep_name_and_ids(tmp_path):
    tok = train_bpe(CORPUS, 300)
    entry = tok.save(tmp_path)
    assert entry == {"name": "bpe-300", "file": TOKENIZER_FILE, "vocab_size": 300, "eot_id": 0}
    for spec in (tmp_path, tmp_path / TOKENIZER_FILE):
        back = load_tokenizer(spec)
        assert back.encode(CORPUS[0]) == tok.encode(CORPUS[0]) and back.vocab_size == 300
    assert load_tokenizer(tmp_path).name == "bpe-300"
    gpt2().save(tmp_path / "g")
    assert (tmp_path / "g" / REFERENCE_FILE).is_file() and load_tokenizer(tmp_path / "g") is gpt2()


def test_tokenizers_pickle():
    for tok in (gpt2(), train_bpe(CORPUS, 300)):
        back = pickle.loads(pickle.dumps(tok))
        assert back.encode(CORPUS[1]) == tok.encode(CORPUS[1]) and back.name == tok.name


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="neither 'gpt2' nor an existing tokenizer.json"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TokenizerError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer_ref.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="at least 300"):
        train_bpe(CORPUS, 100)
