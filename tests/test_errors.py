"""Bad arguments get errors that name the argument, what was received and what was expected."""

import warnings

import pytest
import torch

import fastae
from fastae.functional import resolve_backend


def ok():
    return torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(2, 5)}, r"x: got shape \(2, 5\), expected \(B, 3\)"),
        ({"weight": torch.zeros(4, 3, 1)}, r"weight: got shape \(4, 3, 1\), expected \(H, D\)"),
        ({"bias": torch.zeros(5)}, r"bias: got shape \(5,\), expected \(4,\)"),
        ({"x": torch.zeros(0, 3)}, r"x, weight: got shapes \(0, 3\) and \(4, 3\)"),
        ({"x": torch.zeros(2, 3, dtype=torch.int64)}, r"x: got dtype torch.int64"),
        ({"weight": torch.zeros(4, 3, dtype=torch.float64)}, r"weight: got dtype torch.float64"),
        ({"bias": torch.zeros(4, dtype=torch.float64)}, r"bias: got dtype torch.float64"),
        ({"weight": torch.zeros(4, 3, device="meta")}, r"weight: got device meta"),
        ({"x": [[0.0, 0.0, 0.0]]}, r"x: got list, expected a torch.Tensor"),
        (
            {"x": torch.zeros(2, 3).to_sparse()},
            r"x: got layout torch.sparse_coo, expected a dense \(strided\) tensor",
        ),
        (
            {
                "x": torch.nested.nested_tensor(
                    [torch.zeros(2, 3), torch.zeros(1, 3)], layout=torch.jagged
                )
            },
            r"x: got a nested tensor, expected a dense \(strided\) tensor",
        ),
        (
            {"weight": torch.zeros(4, 3).to_sparse()},
            r"weight: got layout torch.sparse_coo, expected a dense \(strided\) tensor",
        ),
        ({"activation": "gelu"}, r"activation: got 'gelu', expected one of"),
        ({"backend": "cuda"}, r"backend: got 'cuda', expected one of auto, torch, triton"),
    ],
)
def test_encode_argument_errors(change, message):
    x, weight, bias = ok()
    kwargs = {"x": x, "weight": weight, "bias": bias, **change}
    with pytest.raises((ValueError, TypeError), match=message):
        fastae.encode(**kwargs)


def test_strided_nested_tensors_are_refused_too():
    # The strided layout of nested tensors (a prototype torch warns about) passes a layout
    # check and failed deep inside torch.
    x, weight, bias = ok()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nested = torch.nested.nested_tensor([torch.zeros(2, 3), torch.zeros(1, 3)])
    assert nested.layout == torch.strided
    with pytest.raises(TypeError, match=r"x: got a nested tensor, expected a dense"):
        fastae.encode(nested, weight, bias)


def test_reduction_error():
    x, weight, bias = ok()
    with pytest.raises(ValueError, match=r"reduction: got 'avg', expected 'mean', 'sum'"):
        fastae.contractive_penalty(x, weight, bias, reduction="avg")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend: got 'triton' for tensors on cpu"):
        resolve_backend("triton", torch.device("cpu"))


def test_auto_is_torch_on_cpu_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv("FASTAE_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTAE_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv("FASTAE_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"FASTAE_BACKEND: got 'fast'"):
        resolve_backend("auto", torch.device("cpu"))
