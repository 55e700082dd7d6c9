"""Token shards on disk, in llm.c's format so shards can be shared with llm.c and modded-nanogpt.

A shard is a 256 × int32 little-endian header followed by the token ids:
    header[0], header[1] = magic, version: 20240520, 1 for uint16 ids (vocabularies up to 65536: GPT-2's, as
                           llm.c and modded-nanogpt write them), 20240801, 7 for uint32 ids (llm.c's Llama-3
                           shards); 20240520, 2 (uint32) is what caracal wrote before, still read
    header[2] = number of tokens
An end-of-text token precedes every document. A prepared dataset is a directory holding shards named
``{split}_{index:06d}.bin`` (splits ``train`` and ``val``), the tokenizer, and ``manifest.json``
(see `load_manifest`). A plain llm.c folder (``*_train_*.bin``, ``*_val_*.bin``, no manifest) is read too: see
`llmc_manifest`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from caracal_cli.config import CaracalError
from caracal_cli.fileio import atomic_write, write_json

MAGIC = 20240520  # llm.c's GPT-2 shards (uint16)
MAGIC_UINT32 = 20240801  # llm.c's Llama-3 shards (uint32)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DTYPES = {1: np.uint16, 2: np.uint32, 7: np.uint32}  # by version; 2 is caracal's former uint32 form
HEADERS = {(MAGIC, 1), (MAGIC, 2), (MAGIC_UINT32, 7)}  # the (magic, version) pairs read
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "caracal-shards/1"
LLMC_SOURCE = "llm.c folder"  # the manifest's source kind for a plain folder of llm.c shards
LLMC_NAME = re.compile(r"(?:.*_)?(train|val)(?:_(\d+))?\.bin")  # fineweb_train_000001.bin, tiny_shakespeare_val.bin
# llm.c writes uint32 shards only for Llama 3, whose tokenizer is not shipped here: its size and delimiter (BOS)
LLAMA3_UINT32 = {"name": "llama-3 (llm.c uint32 shards; no tokenizer file)", "file": None, "vocab_size": 128256,
                 "eot_id": 128000}


class ShardError(CaracalError):
    """A shard or manifest that cannot be used; the message names the file and the problem."""


def version_for_vocab(vocab_size: int) -> int:
    return 1 if vocab_size <= 1 << 16 else 7


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write `tokens` (any integer array) atomically, as uint16 when `vocab_size` fits, else uint32."""
    version = version_for_vocab(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ShardError(f"{path}: token ids outside [0, {vocab_size})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC if version == 1 else MAGIC_UINT32, version, tokens.size)
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
    if header[0] not in (MAGIC, MAGIC_UINT32):
        raise ShardError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC} or {MAGIC_UINT32})")
    version, count = int(header[1]), int(header[2])
    if (int(header[0]), version) not in HEADERS:
        raise ShardError(f"{path}: unsupported shard version {version} for magic {header[0]}")
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
        if (folder := llmc_manifest(directory)) is not None:
            return folder
        raise ShardError(f"{path}: no manifest (is this a directory made by `caracal prepare`, or a folder of llm.c "
                         f"shards named *_train_*.bin and *_val_*.bin?)")
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
    """Recompute every listed shard's SHA-256 and compare it with the manifest's (a plain llm.c folder has none)."""
    from caracal_cli.fileio import sha256_file

    for shards in manifest["splits"].values():
        for entry in shards:
            if entry["sha256"] is not None and sha256_file(Path(directory) / entry["file"]) != entry["sha256"]:
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


def llmc_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a plain folder of llm.c / modded-nanogpt shards (no manifest.json), or None when `directory`
    holds none. The split is in the file name (``*_train_*.bin``, ``*_val_*.bin``, or ``*_train.bin``), shards in
    the order of their number; every header is read and checked, nothing is written into the folder. The tokenizer
    is the folder's own (a tokenizer.json put there), else GPT-2's for uint16 shards (what llm.c and modded-nanogpt
    write them with) or Llama 3's size for uint32 ones. Checksums are not computed (that would read every token)."""
    directory = Path(directory)
    found: dict[str, list[tuple[int, str]]] = {"train": [], "val": []}
    for path in directory.iterdir():
        if (match := LLMC_NAME.fullmatch(path.name)) and path.is_file():
            found[match[1]].append((int(match[2] or -1), path.name))
    if not any(found.values()):
        return None
    splits, widths = {}, set()
    for split, names in found.items():
        if not names:
            raise ShardError(f"{directory}: llm.c shards without a {split} split (no *_{split}_*.bin)")
        splits[split] = []
        for _, name in sorted(names):
            version, count = read_header(directory / name)
            widths.add(np.dtype(DTYPES[version]).itemsize)
            splits[split].append({"file": name, "tokens": count, "sha256": None})
    if len(widths) > 1:
        raise ShardError(f"{directory}: mixes uint16 and uint32 shards (made with two tokenizers?)")
    from caracal_cli.tokenizer import REFERENCE_FILE, TOKENIZER_FILE, gpt2, load_tokenizer

    if (directory / TOKENIZER_FILE).is_file() or (directory / REFERENCE_FILE).is_file():
        tokenizer = load_tokenizer(directory).entry()
    else:
        tokenizer = gpt2().entry() if widths == {2} else dict(LLAMA3_UINT32)
    return {"format": MANIFEST_FORMAT, "tokenizer": tokenizer, "splits": splits, "complete": True,
            "source": {"kind": LLMC_SOURCE, "path": str(directory.resolve())}}


def keep_folder_manifest(run_dir: str | Path, manifest: dict[str, Any], resume: bool) -> None:
    """For a run on a plain llm.c folder: keep its manifest in the run directory (data_manifest.json) and GPT-2's
    tokenizer reference when that is its tokenizer; on resume, refuse a folder whose shards have changed since.
    Other datasets: nothing to do (their manifest is beside the shards)."""
    source = manifest.get("source")
    if not isinstance(source, dict) or source.get("kind") != LLMC_SOURCE:
        return
    kept = Path(run_dir) / "data_manifest.json"
    if resume and kept.is_file():
        before = json.loads(kept.read_text())
        if before["splits"] != manifest["splits"]:
            raise ShardError(f"{manifest['source']['path']}: the shards differ from those this run started on "
                             f"(listed in {kept}); resume on the same folder")
        return
    write_json(kept, manifest)
    if manifest["tokenizer"]["name"] == "gpt2" and manifest["tokenizer"].get("file") is None:
        from caracal_cli.tokenizer import gpt2

        if not any((Path(run_dir) / name).exists() for name in ("tokenizer.json", "tokenizer_ref.json")):
            gpt2().save(run_dir)
