"""Interoperating with llm.c and modded-nanogpt: their shard files byte for byte (uint16 GPT-2 shards, uint32
Llama-3 shards; caracal's former uint32 form still read), and `train --data` on a plain folder of their shards:
no manifest, nothing written into the folder, a manifest kept in the run directory, resume checked against it."""

from __future__ import annotations

import numpy as np
import pytest

from caracal_cli.config import CaracalError, load_preset
from caracal_cli.shards import ShardError, load_manifest, read_header, read_shard, verify_dataset, write_shard
from caracal_cli.train import train


def llmc_shard(path, tokens: np.ndarray, uint32: bool) -> None:
    """What llm.c's dev/data/data_common.py `write_datafile` writes (its two model descriptions)."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = (20240801, 7, len(tokens)) if uint32 else (20240520, 1, len(tokens))
    with open(path, "wb") as handle:
        handle.write(header.tobytes())
        handle.write(tokens.astype(np.uint32 if uint32 else np.uint16).tobytes())


@pytest.mark.parametrize("vocab_size, uint32", [(50257, False), (128256, True)])
def test_shards_are_llm_c_s_byte_for_byte_both_ways(tmp_path, vocab_size, uint32):
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=5000)
    llmc_shard(tmp_path / "theirs.bin", tokens, uint32)
    write_shard(tmp_path / "ours.bin", tokens, vocab_size)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    assert np.array_equal(read_shard(tmp_path / "theirs.bin"), tokens)


def test_caracals_former_uint32_shards_are_still_read(tmp_path):
    tokens = np.arange(70_000, 70_100)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 2, tokens.size)
    (tmp_path / "old.bin").write_bytes(header.tobytes() + tokens.astype("<u4").tobytes())
    assert read_header(tmp_path / "old.bin") == (2, 100)
    assert np.array_equal(read_shard(tmp_path / "old.bin"), tokens)


def nanogpt_folder(directory, train_shards: int = 2, tokens: int = 6000, vocab: int = 50257, uint32=False):
    """A folder as modded-nanogpt's data script leaves it: fineweb_val_000000.bin, fineweb_train_000001.bin, …"""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    llmc_shard(directory / "fineweb_val_000000.bin", rng.integers(0, vocab, tokens), uint32)
    for i in range(1, train_shards + 1):
        llmc_shard(directory / f"fineweb_train_{i:06d}.bin", rng.integers(0, vocab, tokens), uint32)
    return directory


def test_a_plain_folder_reads_as_a_dataset_by_file_name(tmp_path):
    folder = nanogpt_folder(tmp_path / "fineweb10B", train_shards=11)
    (folder / "README.txt").write_text("not a shard")
    manifest = verify_dataset(folder)
    assert [e["file"] for e in manifest["splits"]["train"]][-2:] == ["fineweb_train_000010.bin",
                                                                     "fineweb_train_000011.bin"]
    assert [e["file"] for e in manifest["splits"]["val"]] == ["fineweb_val_000000.bin"]
    assert manifest["tokenizer"]["name"] == "gpt2" and manifest["source"]["kind"] == "llm.c folder"
    assert sorted(p.name for p in folder.iterdir())[-1] == "fineweb_val_000000.bin"  # nothing written
    assert load_manifest(nanogpt_folder(tmp_path / "llama3", 1, uint32=True))["tokenizer"]["vocab_size"] == 128256


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "fineweb_val_000000.bin").unlink(), "without a val split"),
    (lambda d: llmc_shard(d / "fineweb_train_000003.bin", np.arange(9), True), "mixes uint16 and uint32"),
    (lambda d: (d / "fineweb_train_000002.bin").write_bytes(b"\0" * 2000), "not a token shard"),
    (lambda d: [p.unlink() for p in d.iterdir()], "no manifest"),
])
def test_a_broken_folder_is_refused_naming_the_problem(tmp_path, damage, message):
    folder = nanogpt_folder(tmp_path / "data")
    damage(folder)
    with pytest.raises(ShardError, match=message):
        load_manifest(folder)


def test_train_runs_on_a_modded_nanogpt_folder_with_no_preparation(tmp_path, one_thread):
    folder = nanogpt_folder(tmp_path / "fineweb10B")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    config = load_preset("llama-tiny", ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "model.context=32",
                                        "train.micro_batch=4", "train.global_batch_tokens=128", "train.tokens=1024",
                                        "train.warmup_tokens=128", "train.eval_tokens=256", "train.eval_every=100",
                                        "train.checkpoint_every=100"])
    run = tmp_path / "run"
    assert train(config, folder, run, max_steps=2, device="cpu", quiet=True)["step"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    kept = load_manifest(folder)
    assert (run / "data_manifest.json").is_file() and (run / "tokenizer_ref.json").is_file()
    assert train(None, None, run, resume=True, max_steps=3, device="cpu", quiet=True)["step"] == 3
    llmc_shard(folder / "fineweb_train_000002.bin", np.arange(100), False)  # the folder changed under the run
    assert load_manifest(folder)["splits"] != kept["splits"]
    with pytest.raises(CaracalError, match="not the data the run trained on"):  # train.check_same_data
        train(None, None, run, resume=True, max_steps=4, device="cpu", quiet=True)
