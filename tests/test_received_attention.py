"""received_attention: Triton (interpreted on CPU) vs the explicit softmax reference."""

import pytest
import torch

from flux_engine.ops.received_attention import received_attention, received_attention_reference
from tolerances import FP32_DOT


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,HQ,HKV,T,D", [(2, 4, 2, 37, 16), (1, 2, 2, 8, 24)])
def test_triton_matches_explicit_softmax(device, force_tier, causal, B, HQ, HKV, T, D):
    force_tier("triton", device)
    q = torch.randn(B, HQ, T, D, device=device) * 2
    k = torch.randn(B, HKV, T, D, device=device) * 2
    got = received_attention(q, k, causal=causal)
    want = received_attention_reference(q.cpu(), k.cpu(), causal)
    torch.testing.assert_close(got.cpu(), want, rtol=FP32_DOT[0], atol=FP32_DOT[1])
    torch.testing.assert_close(got.sum(-1).cpu(), torch.ones(B), rtol=1e-5, atol=1e-5)


def test_reference_normalisation():
    q = torch.zeros(1, 1, 4, 8)
    k = torch.zeros(1, 1, 4, 8)
    # Uniform causal attention: query i spreads 1/(i+1) over keys 0..i; key j gets sum_{i>=j} 1/(i+1), over T.
    got = received_attention(q, k, causal=True)[0]
    want = torch.tensor([sum(1 / (i + 1) for i in range(j, 4)) / 4 for j in range(4)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        received_attention(torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8))


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask(device, force_tier, causal):
    B, HQ, HKV, T, D = 2, 2, 1, 20, 16
    q, k = torch.randn(B, HQ, T, D, device=device), torch.randn(B, HKV, T, D, device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[0, 13:] = 0
    want = received_attention_reference(q.cpu(), k.cpu(), causal, mask.cpu())
    # A right-padded row equals the unpadded computation on its real prefix.
    torch.testing.assert_close(want[0, :13], received_attention_reference(q[:1, :, :13].cpu(), k[:1, :, :13].cpu(), causal)[0])
    assert float(want[0, 13:].abs().sum()) == 0.0
    force_tier("triton", device)
    got = received_attention(q, k, causal=causal, mask=mask)
    torch.testing.assert_close(got.cpu(), want, rtol=FP32_DOT[0], atol=FP32_DOT[1])
