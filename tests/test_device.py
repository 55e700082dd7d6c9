import pytest
import torch

from caracal_cli.device import DeviceError, resolve_device, to_device


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_is_refused_without_cuda(name):
    with pytest.raises(DeviceError, match=f"--device {name}: no CUDA device"):
        resolve_device(name)


def test_unknown_device_is_refused():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_to_device_keeps_a_cpu_batch_as_it_is():
    batch = torch.arange(12).view(3, 4)
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved, batch) and moved.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_copies_to_the_gpu_through_pinned_memory():
    batch = torch.randint(0, 50257, (32, 512))
    moved = to_device(batch, torch.device("cuda"))
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), batch)
