"""mamba_ssm's CUDA kernels against caracal's reference PyTorch path, on the same weights. Needs a CUDA machine
with mamba_ssm (see shared/wheels/README.md); skipped elsewhere. `-s` shows the error table. The first Mamba-2
calls autotune Triton kernels (about a minute per dtype on an H100)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from caracal_cli.config import ModelConfig, load_preset
from caracal_cli.mixers import build_mixer
from caracal_cli.mixers.mamba import choose_path, mamba_backend
from caracal_cli.model import build_model, kernel_paths

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not mamba_backend().available, reason=f"needs mamba_ssm ({mamba_backend().reason})"),
]

# max|library − reference| / max|reference|: float32 differs by summation order and Triton's tf32 (Mamba-2);
# bf16 autocast by where each path rounds.
TOLERANCE = {("mamba", torch.float32): 1e-4, ("mamba2", torch.float32): 5e-3,
             ("mamba", torch.bfloat16): 5e-2, ("mamba2", torch.bfloat16): 5e-2}


def gpu_check():
    path = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check_mamba.py"
    spec = importlib.util.spec_from_file_location("gpu_check_mamba", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_picks_the_library_on_cuda():
    assert choose_path("auto", torch.device("cuda")) == "library"
    assert choose_path("auto", torch.device("cpu")) == "reference"
    with pytest.raises(RuntimeError, match="CUDA kernels"):
        choose_path("library", torch.device("cpu"))
    model = build_model(load_preset("jamba-demo").model)
    assert kernel_paths(model, torch.device("cuda"))["Mamba"].startswith("mamba_ssm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_library_and_reference_agree(kind, dtype):
    row = gpu_check().compare(kind, dtype, d_model=768, length=1024, batch=2)
    print(f"\n{kind} {row['dtype']}: output max abs {row['out_abs']:.2e} rel {row['out_rel']:.2e}; "
          f"gradients max rel {row['grad_rel']:.2e} ({row['worst_grad']}); all: "
          + ", ".join(f"{n} {e:.1e}" for n, e in row["grad_rel_all"].items()))
    assert row["out_rel"] < TOLERANCE[kind, dtype]
    assert row["grad_rel"] < 2 * TOLERANCE[kind, dtype]


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_state_dicts_move_between_the_library_module_and_the_mixer(kind):
    backend, d = mamba_backend(), 768
    if kind == "mamba":
        lib = backend.mamba(d, d_state=16, device="cuda")
    else:
        lib = backend.mamba2(d, d_state=16, headdim=64, use_mem_eff_path=backend.causal_conv1d, device="cuda")
    mixer = build_mixer({"kind": kind, "d_state": 16, "impl": "reference"}, ModelConfig(d_model=d, n_head=12)).cuda()
    mixer.load_state_dict(lib.state_dict(), strict=True)
    lib.load_state_dict(mixer.state_dict(), strict=True)
    x = torch.randn(2, 512, d, device="cuda")
    with torch.no_grad():
        want, got = lib(x), mixer(x)
    assert (got - want).abs().max() / want.abs().max() < 5e-3


@pytest.mark.parametrize("raw", [{"kind": "mamba"}, {"kind": "mamba2", "d_state": 16},
                                 {"kind": "mamba2", "d_state": 16, "headdim": 32, "ngroups": 2}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_library_step_equals_the_reference_step(raw, dtype):
    """mamba_ssm's selective_state_update step against the reference recurrence, same weights and caches."""
    cfg = ModelConfig(d_model=256, n_head=4)
    lib = build_mixer(raw, cfg).cuda()
    ref = build_mixer({**raw, "impl": "reference"}, cfg).cuda()
    ref.load_state_dict(lib.state_dict())
    x = torch.randn(2, 24, 256, device="cuda")
    outputs = []
    for mixer in (lib, ref):
        cache = mixer.init_cache(2, 24, "cuda", dtype)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            ys = [mixer(x[:, :8], cache)] + [mixer.step(x[:, t:t + 1], cache) for t in range(8, 24)]
        outputs.append(torch.cat(ys, 1).float())
    assert (outputs[0] - outputs[1]).abs().max() / outputs[1].abs().max() < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba"])
def test_demo_model_trains_on_the_library_path_and_decodes_like_it(family):
    model = build_model(load_preset(f"{family}-demo").model).cuda()
    assert all(p.startswith("mamba_ssm") for n, p in kernel_paths(model, torch.device("cuda")).items() if "Mamba" in n)
    ids = torch.randint(0, model.config.vocab_size, (4, 129), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses
    with torch.no_grad():  # cached decoding (selective_state_update steps) against the library's forward, float32
        full = model(ids[:1, :40])
        caches = model.init_caches(1, 40)
        steps = [model(ids[:1, :8], caches)] + [model(ids[:1, t:t + 1], caches) for t in range(8, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() / full.abs().max() < 5e-3
