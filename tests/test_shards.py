"""Token shards in llm.c's format, and the manifest that lists them."""

import json
import os

import numpy as np
import pytest

from caracal_cli.fileio import sha256_file
from caracal_cli.shards import (HEADER_BYTES, MAGIC, MAGIC_UINT32, ShardError, check_vocab_fits, load_manifest,
                                read_header, read_shard, save_manifest, split_tokens, verify_checksums, verify_dataset,
                                write_shard)


@pytest.mark.parametrize("vocab_size, magic, version, dtype", [(50257, MAGIC, 1, np.uint16),
                                                               (65536, MAGIC, 1, np.uint16),
                                                               (100_000, MAGIC_UINT32, 7, np.uint32)])
def test_roundtrip_and_header(tmp_path, vocab_size, magic, version, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=1000)
    tokens[0], tokens[-1] = 0, vocab_size - 1
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens, vocab_size)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert (header[0], header[1], header[2]) == (magic, version, 1000) and not header[3:].any()
    assert len(raw) == HEADER_BYTES + 1000 * np.dtype(dtype).itemsize
    assert read_header(path) == (version, 1000)
    back = read_shard(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, tokens)
    # what llm.c's and modded-nanogpt's loaders do: header as int32, then raw little-endian ids
    assert np.array_equal(np.frombuffer(raw[HEADER_BYTES:], dtype=np.dtype(dtype).newbyteorder("<")), tokens)


def test_empty_shard_and_ids_out_of_range(tmp_path):
    write_shard(tmp_path / "a.bin", np.array([], dtype=np.int64), 100)
    assert read_header(tmp_path / "a.bin") == (1, 0)
    with pytest.raises(ShardError, match="outside"):
        write_shard(tmp_path / "b.bin", np.array([1, 100]), 100)
    assert not (tmp_path / "b.bin").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:100], "truncated shard"),
    (lambda raw: raw[:-2], "corrupt or truncated"),
    (lambda raw: raw + b"\0\0", "corrupt or truncated"),
    (lambda raw: b"\1\2\3\4" + raw[4:], "not a token shard"),
    (lambda raw: raw[:4] + np.int32(7).tobytes() + raw[8:], "unsupported shard version 7"),
])
def test_damaged_shards_are_refused(tmp_path, damage, message):
    path = tmp_path / "val_000000.bin"
    write_shard(path, np.arange(50), 50257)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ShardError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value)


def _dataset(tmp_path):
    entries = {}
    for split, n in (("train", 300), ("val", 40)):
        name = f"{split}_000000.bin"
        write_shard(tmp_path / name, np.arange(n) % 50257, 50257)
        entries[split] = [{"file": name, "tokens": n, "sha256": sha256_file(tmp_path / name)}]
    manifest = {"format": "caracal-shards/1", "tokenizer": {"name": "gpt2", "file": None, "vocab_size": 50257,
                                                            "eot_id": 50256},
                "splits": entries, "source": {"kind": "test", "args": {}}, "command": [], "complete": True}
    save_manifest(tmp_path, manifest)
    return manifest


def test_manifest_roundtrip_and_split_tokens(tmp_path):
    manifest = _dataset(tmp_path)
    assert load_manifest(tmp_path) == manifest
    assert verify_dataset(tmp_path) == manifest
    (train,) = split_tokens(tmp_path, manifest, "train")
    assert len(train) == 300
    with pytest.raises(ShardError, match="no 'test' split"):
        split_tokens(tmp_path, manifest, "test")


def test_manifest_that_disagrees_with_its_shards(tmp_path):
    manifest = _dataset(tmp_path)
    manifest["splits"]["train"][0]["tokens"] = 301
    save_manifest(tmp_path, manifest)
    with pytest.raises(ShardError, match="holds 300 tokens, manifest says 301"):
        load_manifest(tmp_path)
    manifest = _dataset(tmp_path)
    path = tmp_path / "val_000000.bin"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content: only the checksum notices
    path.write_bytes(bytes(raw))
    load_manifest(tmp_path)
    with pytest.raises(ShardError, match="val_000000.bin: checksum differs"):
        verify_checksums(tmp_path, manifest)


@pytest.mark.parametrize("content, message", [(None, "no manifest"), ("{not json", "not valid JSON"),
                                              ('{"format": "other"}', "not a caracal-shards/1 manifest")])
def test_bad_manifests(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ShardError, match=message):
        load_manifest(tmp_path)
    with pytest.raises(ShardError, match="data directory not found"):
        load_manifest(tmp_path / "nope")


def test_missing_shard(tmp_path):
    _dataset(tmp_path)
    (tmp_path / "train_000000.bin").unlink()
    with pytest.raises(ShardError, match="train_000000.bin: shard not found"):
        load_manifest(tmp_path)


def test_check_vocab_fits():
    manifest = {"tokenizer": {"name": "gpt2", "vocab_size": 50257}}
    check_vocab_fits(manifest, 50257)
    check_vocab_fits(json.loads(json.dumps(manifest)), 50304)  # a padded embedding is fine
    with pytest.raises(ShardError, match="'gpt2' has 50257 ids, more than the model's vocab_size 4096"):
        check_vocab_fits(manifest, 4096)


def test_prepare_verify_command_checks_checksums(tmp_path):
    from typer.testing import CliRunner

    from caracal_cli.cli import app

    result = CliRunner().invoke(app, ["prepare", "shakespeare", "-o", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    ok = CliRunner().invoke(app, ["prepare", "verify", str(tmp_path / "data"), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["complete"] is True
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "data" / "train_000000.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    shard = tmp_path / "data" / "val_000000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = CliRunner().invoke(app, ["prepare", "verify", str(tmp_path / "data")])
    assert bad.exit_code == 1 and "checksum differs" in bad.output and "Traceback" not in bad.output
