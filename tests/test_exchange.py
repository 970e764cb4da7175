"""The exchange pipeline: precision compressors, stage specs, and user-defined stages through every
strategy on both backends."""

import pytest
import torch

from sgdlab import exchange


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8", "int4"])
def test_precision_compressors(precision):
    g = torch.Generator().manual_seed(0)
    for n in (1, 127, 128, 129, 1001):
        x = torch.randn(n, generator=g) * torch.logspace(-3, 2, n)
        c = exchange.compressors.get(precision)()
        payload = c.encode(x)
        assert c.payload_bytes(payload) == c.nbytes(n)
        y = c.decode(payload, n)
        assert y.shape == x.shape
        if precision == "fp32":
            assert torch.equal(x, y)
        elif precision in ("int8", "int4"):
            qmax = 127 if precision == "int8" else 7
            blocks = torch.nn.functional.pad(x, (0, (-n) % 128)).view(-1, 128)
            bound = (blocks.abs().amax(1) / qmax / 2).repeat_interleave(128)[:n]
            assert ((x - y).abs() <= bound * (1 + 1e-6) + 1e-12).all()
        else:
            torch.testing.assert_close(y, x, rtol=1e-2, atol=0)


