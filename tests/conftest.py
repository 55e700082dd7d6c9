"""Shared test helpers: small model configs, and example configs for every registered mixer."""

from __future__ import annotations

import gc
import os

import pytest
import torch

# Without a GPU, Triton's interpreter runs the Triton kernels on CPU tensors (slowly, but exactly enough for
# their tests). It must be chosen before the kernels are defined, i.e. before caracal_cli imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from caracal_cli.config import ModelConfig  # noqa: E402

# Every mixer kind in the registry needs at least one example here: tests parametrize over them, so a new
# mixer gets causality, shape, dtype, gradient and cache checks for free.
MIXER_EXAMPLES: dict[str, list[dict]] = {
    "mhf": [
        {"kind": "mhf"},
        {"kind": "mhf", "gate": "linear"},
        {"kind": "mhf", "pre_conv": False, "value_from": "x_norm", "scale": "mean", "decode_block": 3},
        {"kind": "mhf", "gate_kernel": 1, "scale": "none", "decode_block": 4},
    ],
    "attention": [
        {"kind": "attention"},
        {"kind": "attention", "window": 5},
    ],
    "mamba": [
        {"kind": "mamba"},
        {"kind": "mamba", "d_state": 4, "d_conv": 2, "expand": 1, "dt_rank": 3, "bias": True, "conv_bias": False},
    ],
    "mamba2": [
        {"kind": "mamba2", "d_state": 8, "headdim": 16, "reference_chunk": 4},
        {"kind": "mamba2", "d_state": 4, "headdim": 8, "ngroups": 2, "d_conv": 3, "reference_chunk": 5, "bias": True},
    ],
    "swh": [
        {"kind": "swh", "chunk": 4},
        {"kind": "swh", "width": 16, "heads": 2, "chunk": 3},
        {"kind": "swh", "rope": False, "chunk": 32},
    ],
}


def all_mixer_examples() -> list[tuple[str, dict]]:
    return [(f"{kind}-{i}", raw) for kind, examples in MIXER_EXAMPLES.items() for i, raw in enumerate(examples)]


def small_model_config(**overrides) -> ModelConfig:
    """A model small enough for float64 checks in milliseconds."""
    values = dict(vocab_size=97, d_model=32, n_layer=3, n_head=4, context=64, pattern="FFA",
                  mixers={"F": {"kind": "mhf"}, "A": {"kind": "attention", "window": 5}})
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """Each module starts with what earlier modules left alive (lm-eval, transformers, compiled graphs: millions
    of objects) frozen out of the cyclic collector, as a fresh process would not have them: `caracal speed` and the
    trainer call gc.collect() between points and on OOM, and late in the suite each call scanned the whole heap
    (the speed tests ran 1.5–2.5x slower there than alone). Frozen objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session, exitstatus):
    gc.unfreeze()  # and collect, so that nothing frozen is reported as leaked at exit (Triton's nanobind objects)
    gc.collect()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): their
    tensors are tiny, and on a busy 2-core machine a second OpenMP thread spins while the other core works and
    can run ten times slower. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
