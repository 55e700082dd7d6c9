import pytest
import torch

from caracal_cli.device import DeviceError, resolve_device


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
