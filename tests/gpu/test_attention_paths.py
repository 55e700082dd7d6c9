"""On CUDA, sliding-window attention runs flex_attention with a block mask at multiples of 128 tokens; other
lengths and devices use SDPA with a band mask. They must compute the same function: compare them on the GPU
(skipped without CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from caracal_cli.mixers import build_mixer
from caracal_cli.mixers.attention import band_mask
from conftest import small_model_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flex_attention path)")]


@pytest.mark.parametrize("length, window", [(128, 16), (512, 256), (1024, 256), (2048, 256)])
def test_flex_attention_equals_band_masked_sdpa(length, window):
    config = small_model_config(d_model=128, n_head=2, context=length)
    mixer = build_mixer({"kind": "attention", "window": window}, config).cuda()
    x = torch.randn(2, length, 128, device="cuda")
    B, L, D = x.shape
    with torch.no_grad():
        flex = mixer(x)
        q, k, v = mixer.qkv(x).view(B, L, 3, 2, 64).permute(2, 0, 3, 1, 4)
        band = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(L, L, window, x.device))
        band = mixer.out(band.transpose(1, 2).reshape(B, L, D))
    torch.testing.assert_close(flex, band, rtol=2e-3, atol=2e-3)
