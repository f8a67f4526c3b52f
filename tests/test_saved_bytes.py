"""Memory discipline of the backward: what the fused Function keeps alive, counted with
saved_tensors_hooks, against eager autograd of the same closed form."""

import pytest
import torch
from cases import encoder_case

import fastae


def saved_bytes(run, inputs):
    """Bytes of the tensors autograd saves while run() builds its graph, leaving out tensors that
    are the inputs themselves (same storage, same shape)."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()

    def is_input(tensor):
        return any(tensor.data_ptr() == t.data_ptr() and tensor.shape == t.shape for t in inputs)

    return sum(t.numel() * t.element_size() for t in saved if not is_input(t))


def eager_closed_form(x, weight, bias):
    a = x @ weight.t() + bias
    h = torch.sigmoid(a)
    fp = h * (1 - h)
    n = weight.square().sum(1)
    contractive = (fp.square() * n).sum(1).mean()
    return h, contractive, h.mean(0), h.abs().sum(1).mean()


@pytest.mark.parametrize("shape", [(64, 32, 48), (256, 100, 16)])
def test_fused_saves_at_most_1_1_times_h(shape):
    x, weight, bias = encoder_case(*shape, dtype=torch.float32)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    h_bytes = shape[0] * shape[2] * 4

    fused = saved_bytes(lambda: fastae.encode(x, weight, bias, backend="torch"), (x, weight, bias))
    eager = saved_bytes(lambda: eager_closed_form(x, weight, bias), (x, weight, bias))

    # h itself plus two (H,) vectors: the row norms n_j and the column sums of f'^2.
    assert fused == h_bytes + 2 * shape[2] * 4
    assert fused <= 1.1 * h_bytes
    assert eager >= 3.5 * h_bytes
