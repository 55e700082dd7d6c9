"""Token shards on disk, in llm.c's format so shards can be shared with llm.c and modded-nanogpt.

A shard is a 256 × int32 little-endian header followed by the token ids:
    header[0] = 20240520 (magic)
    header[1] = 1 (ids are uint16, vocabularies up to 65536) or 2 (uint32, larger vocabularies)
    header[2] = number of tokens
An end-of-text token precedes every document. A prepared dataset is a directory holding shards named
``{split}_{index:06d}.bin`` (splits ``train`` and ``val``), the tokenizer, and ``manifest.json``
(see `load_manifest`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from caracal_cli.config import CaracalError
from caracal_cli.fileio import atomic_write, write_json

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DTYPES = {1: np.uint16, 2: np.uint32}
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "caracal-shards/1"


class ShardError(CaracalError):
    """A shard or manifest that cannot be used; the message names the file and the problem."""


def version_for_vocab(vocab_size: int) -> int:
    return 1 if vocab_size <= 1 << 16 else 2


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write `tokens` (any integer array) atomically, as uint16 when `vocab_size` fits, else uint32."""
    version = version_for_vocab(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ShardError(f"{path}: token ids outside [0, {vocab_size})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, version, tokens.size)
    with atomic_write(path) as handle:
        handle.write(header.tobytes())
        handle.write(tokens.astype(np.dtype(DTYPES[version]).newbyteorder("<"), copy=False).tobytes())


def read_header(path: str | Path) -> tuple[int, int]:
    """(version, token count) of a shard, checking magic, version and that the file holds every token."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC})")
    version, count = int(header[1]), int(header[2])
    if version not in DTYPES:
        raise ShardError(f"{path}: unsupported shard version {version}")
    expected = HEADER_BYTES + count * np.dtype(DTYPES[version]).itemsize
    if size != expected:
        raise ShardError(f"{path}: corrupt or truncated shard ({size} bytes, header promises {expected})")
    return version, count


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only memory map (no copy)."""
    version, count = read_header(path)
    return np.memmap(path, dtype=np.dtype(DTYPES[version]).newbyteorder("<"), mode="r",
                     offset=HEADER_BYTES, shape=(count,))


def save_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    write_json(Path(directory) / MANIFEST, manifest)


def load_manifest(directory: str | Path, check_shards: bool = True) -> dict[str, Any]:
    """Read ``manifest.json`` of a prepared dataset and check it against the shards it lists.

    The manifest holds: ``format``, ``tokenizer`` ({name, file, vocab_size, eot_id}), ``splits``
    ({split: [{file, tokens, sha256, max_id}]}; max_id, the largest id, is absent in older manifests), ``source``,
    ``command``, ``complete``. With `check_shards`, every
    listed shard must exist, have a valid header and hold the listed number of tokens (checksums are not
    recomputed here: that is `verify_checksums`).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ShardError(f"{directory}: data directory not found (make one with `caracal prepare`)")
    if not path.is_file():
        raise ShardError(f"{path}: no manifest (is this a directory made by `caracal prepare`?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    for key in ("tokenizer", "splits"):
        if key not in manifest:
            raise ShardError(f"{path}: missing key {key!r}")
    if check_shards:
        for shards in manifest["splits"].values():
            for entry in shards:
                _, count = read_header(directory / entry["file"])
                if count != entry["tokens"]:
                    raise ShardError(f"{directory / entry['file']}: holds {count} tokens, "
                                     f"manifest says {entry['tokens']}")
    return manifest


def verify_checksums(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Recompute every listed shard's SHA-256 and compare it with the manifest's."""
    from caracal_cli.fileio import sha256_file

    for shards in manifest["splits"].values():
        for entry in shards:
            if sha256_file(Path(directory) / entry["file"]) != entry["sha256"]:
                raise ShardError(f"{Path(directory) / entry['file']}: checksum differs from the manifest "
                                 f"(the shard was changed or damaged)")


def verify_dataset(directory: str | Path) -> dict[str, Any]:
    """`load_manifest`, `verify_checksums` and every shard's largest id read again (`check_max_ids`): the
    manifest, once every shard is known to be what it lists."""
    manifest = load_manifest(directory)
    verify_checksums(directory, manifest)
    check_max_ids(directory, manifest, recompute=True)
    return manifest


def check_vocab_fits(manifest: dict[str, Any], model_vocab_size: int) -> None:
    """Refuse data whose tokenizer has more ids than the model's embedding (a smaller vocabulary is fine)."""
    tokenizer = manifest["tokenizer"]
    if int(tokenizer["vocab_size"]) > model_vocab_size:
        raise ShardError(f"the data's tokenizer {tokenizer.get('name')!r} has {tokenizer['vocab_size']} ids, "
                         f"more than the model's vocab_size {model_vocab_size} (use a preset whose "
                         f"model.vocab_size >= {tokenizer['vocab_size']}, or --set "
                         f"model.vocab_size={tokenizer['vocab_size']})")


def shard_max_id(path: str | Path) -> int:
    """The largest token id in a shard (-1 when it is empty): one pass over its memory map."""
    tokens = read_shard(path)
    return int(tokens.max()) if tokens.size else -1


def check_max_ids(directory: str | Path, manifest: dict[str, Any], recompute: bool = False) -> None:
    """Refuse a shard holding an id outside the tokenizer's vocabulary, by the largest id the manifest records
    for it (`max_id`), or read from the shard when the manifest has none (older datasets) or `recompute`."""
    vocab = int(manifest["tokenizer"]["vocab_size"])
    for shards in manifest["splits"].values():
        for entry in shards:
            path = Path(directory) / entry["file"]
            recorded = entry.get("max_id")
            top = shard_max_id(path) if recorded is None or recompute else int(recorded)
            if recorded is not None and top != int(recorded):
                raise ShardError(f"{path}: its largest token id is {top}, the manifest says {recorded} (the shard "
                                 f"was changed or damaged)")
            if top >= vocab:
                raise ShardError(f"{path}: holds token id {top}, outside the tokenizer's vocabulary of {vocab} ids "
                                 f"(the shard is damaged or was made with another tokenizer)")


def split_tokens(directory: str | Path, manifest: dict[str, Any], split: str) -> list[np.ndarray]:
    """Memory maps of every shard of `split`, in order."""
    if split not in manifest["splits"] or not manifest["splits"][split]:
        raise ShardError(f"{directory}: the dataset has no {split!r} split")
    return [read_shard(Path(directory) / entry["file"]) for entry in manifest["splits"][split]]
