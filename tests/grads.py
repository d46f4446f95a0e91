"""Gradient comparison shared by the tests of equivalent forwards (packed vs padded, cached vs full)."""
import torch


def assert_same_grads(got: dict, want: dict) -> None:
    """The same parameters, with gradients equal up to float noise relative to each gradient's scale
    (summed losses give gradients of order 100, where an absolute 1e-6 is below float32 resolution)."""
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)
