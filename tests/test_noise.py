"""Input corruption (denoising) drawn inside the encoder kernels, under Triton's interpreter, and
in the PyTorch path.

The kernels never store x~; fastae.functional.noise.corrupt(x, noise, "triton") recovers it with
the debug kernel (fastae.kernels.materialize_noise) from the same key. The Triton gradients are
checked against the PyTorch path and the reference run on that recovered x~ with no corruption.
"""

import math
import os
import tempfile

import pytest
import torch
import triton
import triton.language as tl
from cases import encoder_case

import fastae
from fastae.functional.noise import KINDS
from fastae.functional.noise import Noise
from fastae.functional.noise import corrupt
from fastae.kernels.encoder_forward import interpreted
from fastae.kernels.noise import NOISE_CODES
from fastae.kernels.noise import draw_tile

pytestmark = pytest.mark.skipif(
    not interpreted(), reason="interpreter tier: TRITON_INTERPRET=1 (tests/conftest.py sets it)"
)

KIND_LEVELS = [("gaussian", 0.3), ("masking", 0.3), ("salt-and-pepper", 0.2)]
NAMES = ("h", "contractive", "rho_hat", "l1", "grad_x", "grad_w", "grad_b")
# 10^5 entries for the statistics of the corruptions.
STAT_SHAPE = (250, 400)


def data(batch, features, hidden, seed=0, low=0.0, high=1.0):
    """x in the data range (uniform), W and b from the shared case, all fp32 leaves."""
    _, weight, bias = encoder_case(batch, features, hidden, dtype=torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    x = low + (high - low) * torch.rand(batch, features, generator=gen)
    return [t.clone().requires_grad_(True) for t in (x, weight, bias)]


def run(x, weight, bias, activation, backend, noise=None):
    """h, the statistics and the gradients of a loss that uses all four outputs."""
    if backend == "reference":
        h, stats = fastae.reference.encode(x, weight, bias, activation)
    else:
        h, stats = fastae.encode(x, weight, bias, activation, backend=backend, noise=noise)
    grad_h = torch.linspace(-1.0, 1.0, h.numel()).reshape(h.shape)
    grad_r = torch.linspace(0.5, -1.5, weight.shape[0])
    loss = (h * grad_h).sum() + 0.7 * stats.contractive + (stats.rho_hat * grad_r).sum()
    loss = loss + 0.3 * stats.l1
    grads = torch.autograd.grad(loss, (x, weight, bias))
    return (h.detach(), *(s.detach() for s in stats), *grads)


def assert_matches(got, want, rtol=1e-5):
    # As in test_triton_encode: rtol per element plus rtol times the largest |value|, for sums
    # with cancellation.
    for name, a, b in zip(NAMES, got, want, strict=True):
        atol = rtol * max(b.abs().max().item(), 1e-30)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def on_recovered_x_tilde(x, weight, bias, activation, noise, backend):
    """What `run` should give with `noise`: `backend` run on the x~ the kernels used, without
    corruption, with dL/dx multiplied by dx~/dx (chain rule through the corruption)."""
    x_tilde, keep = corrupt(x, noise, "triton", with_derivative=True)
    x_tilde.requires_grad_(True)
    want = list(run(x_tilde, weight, bias, activation, backend))
    want[4] = want[4] * keep
    return want, x_tilde.detach(), keep


# Interpreter: the Triton gradients equal those on the recovered x~.


@pytest.mark.parametrize("kind,level", KIND_LEVELS, ids=[k for k, _ in KIND_LEVELS])
@pytest.mark.parametrize(
    "shape,activation",
    [((37, 45, 53), "sigmoid"), ((5, 19, 7), "tanh"), ((33, 17, 20), "relu")],
    ids=["37x45x53-sigmoid", "5x19x7-tanh", "33x17x20-relu"],
)
def test_triton_gradients_equal_torch_on_the_recovered_x_tilde(shape, activation, kind, level):
    x, weight, bias = data(*shape, seed=1)
    noise = Noise(kind, level, seed=11, step=3)
    got = run(x, weight, bias, activation, "triton", noise)
    want, x_tilde, keep = on_recovered_x_tilde(x, weight, bias, activation, noise, "torch")
    assert_matches(got, want)

    # The corruption really acted, and dx~/dx zeroed the gradient of the entries it replaced.
    assert not torch.equal(x_tilde, x.detach())
    assert 0 < (keep == 0).sum() < keep.numel()
    assert torch.all(got[4][keep == 0] == 0)


def test_triton_gradients_equal_the_reference_on_the_recovered_x_tilde():
    x, weight, bias = data(24, 40, 18, seed=2, low=-1.0, high=2.0)
    noise = Noise("gaussian", 0.5, low=-1.0, high=2.0, seed=5, step=9)
    got = run(x, weight, bias, "softplus", "triton", noise)
    want, _, _ = on_recovered_x_tilde(x, weight, bias, "softplus", noise, "reference")
    assert_matches(got, want)


def test_backward_draws_the_same_x_tilde_as_the_forward():
    # W = I, b = 0, identity activation: h is exactly the x~ of the forward kernel. With
    # g_h = I (B = H), dL/dW = g_h^T x~ is exactly the x~ that the dL/dW kernel drew again.
    size = 37
    for kind, level in KIND_LEVELS:
        noise = Noise(kind, level, seed=2, step=7)
        x = data(size, size, size, seed=3)[0].detach()
        weight = torch.eye(size, requires_grad=True)
        h, _ = fastae.encode(x, weight, None, "identity", backend="triton", noise=noise)
        (grad_w,) = torch.autograd.grad((h * torch.eye(size)).sum(), weight)
        x_tilde = corrupt(x, noise, "triton")
        assert torch.equal(h.detach(), x_tilde), kind
        assert torch.equal(grad_w, x_tilde), kind
        assert not torch.equal(x_tilde, x), kind


@pytest.mark.parametrize("kind,level", [("gaussian", 0.4), ("masking", 0.3)])
def test_gradcheck_fp64_through_the_corruption(kind, level):
    # Finite differences see x -> x~ with the noise fixed by the key: the chain rule through the
    # corruption (dx~/dx) is checked independently of the torch path.
    x, weight, bias = (t.detach().double().requires_grad_(True) for t in data(5, 7, 3, seed=4))
    noise = Noise(kind, level, seed=1, step=2)
    x_tilde, keep = corrupt(x, noise, "triton", with_derivative=True)
    # Unclipped entries (x~ = x + sigma n) lie at least 1e-3 inside [0, 1]: the finite
    # differences of gradcheck cannot cross a clipping kink.
    inside = x_tilde[keep == 1]
    assert torch.minimum(inside, 1 - inside).min() > 1e-3

    def outputs(x, weight, bias):
        h, stats = fastae.encode(x, weight, bias, "sigmoid", backend="triton", noise=noise)
        return h, stats.contractive, stats.rho_hat, stats.l1

    assert torch.autograd.gradcheck(outputs, (x, weight, bias))


# The distributions, over 10^5 entries (debug kernel for Triton, the generator for torch).


def uniform_data(low=0.1, high=0.9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(*STAT_SHAPE, generator=gen)


def within_three_standard_errors(count, total, p):
    standard_error = math.sqrt(p * (1 - p) / total)
    return abs(count / total - p) <= 3 * standard_error


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masking_fraction_and_survivors(backend):
    # x in [0.1, 0.9]: a zero can only come from the mask.
    x = uniform_data()
    nu = 0.3
    x_tilde, keep = corrupt(x, Noise("masking", nu, seed=3), backend, with_derivative=True)
    masked = x_tilde == 0
    assert within_three_standard_errors(masked.sum().item(), x.numel(), nu)
    assert torch.equal(x_tilde[~masked], x[~masked])
    assert torch.equal(keep, (~masked).float())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_salt_and_pepper_hits_both_ends_equally(backend):
    x = uniform_data(seed=1)
    nu = 0.2
    low, high = -1.0, 2.0
    x_tilde, keep = corrupt(
        x, Noise("salt-and-pepper", nu, low=low, high=high, seed=4), backend, with_derivative=True
    )
    salt = x_tilde == high
    pepper = x_tilde == low
    hit = salt | pepper
    assert within_three_standard_errors(hit.sum().item(), x.numel(), nu)
    assert within_three_standard_errors(salt.sum().item(), hit.sum().item(), 0.5)
    assert torch.equal(x_tilde[~hit], x[~hit])
    assert torch.equal(keep, (~hit).float())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gaussian_is_normal_and_stays_in_range(backend):
    # Far from the ends (x = 0.5, sigma = 0.05: 10 sigma), (x~ - x) / sigma is N(0, 1): its mean
    # and standard deviation within 3 standard errors (1 / sqrt(N) and 1 / sqrt(2N)).
    x = torch.full(STAT_SHAPE, 0.5)
    sigma = 0.05
    z = (corrupt(x, Noise("gaussian", sigma, seed=5), backend) - x).double() / sigma
    count = z.numel()
    assert abs(z.mean().item()) <= 3 / math.sqrt(count)
    assert abs(z.std().item() - 1) <= 3 / math.sqrt(2 * count)
    assert abs((z.abs() < 1).double().mean().item() - 0.6826894921) <= 3 * math.sqrt(0.22 / count)
    # Entries 4g .. 4g + 3 share one Philox call (and 4g, 4g + 1 one Box-Muller pair): they
    # must still be uncorrelated, |r| within 3 / sqrt(n) of 0.
    words = z.reshape(STAT_SHAPE[0], -1, 4).reshape(-1, 4)
    for i, j in ((0, 1), (0, 2), (1, 3)):
        r = torch.corrcoef(torch.stack([words[:, i], words[:, j]]))[0, 1].item()
        assert abs(r) <= 3 / math.sqrt(words.shape[0]), (i, j, r)

    # Near the ends with a large sigma: every value in range, both ends reached by clipping,
    # dx~/dx = 0 exactly where clipped.
    x = uniform_data(0.0, 1.0, seed=2)
    x_tilde, keep = corrupt(x, Noise("gaussian", 0.5, seed=6), backend, with_derivative=True)
    assert x_tilde.min() >= 0.0 and x_tilde.max() <= 1.0
    clipped = (x_tilde == 0) | (x_tilde == 1)
    assert (x_tilde == 0).sum() > 1000 and (x_tilde == 1).sum() > 1000
    assert torch.equal(keep, (~clipped).float())


# Keying: (seed, step) fixes the noise.


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_noise_differs_between_steps_and_repeats_from_the_same_seed(backend):
    x = uniform_data(seed=3)
    noise = Noise("masking", 0.3, seed=7, step=0)
    first = corrupt(x, noise, backend) == 0
    again = corrupt(x, Noise("masking", 0.3, seed=7, step=0), backend) == 0
    next_step = corrupt(x, noise.at(1), backend) == 0
    other_seed = corrupt(x, Noise("masking", 0.3, seed=8, step=0), backend) == 0
    assert torch.equal(first, again)
    # Independent masks agree on a fraction 0.3^2 + 0.7^2 = 0.58 of the entries.
    for other in (next_step, other_seed):
        agree = (first == other).double().mean().item()
        assert abs(agree - 0.58) < 0.01


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_encode_repeats_from_the_same_key(backend):
    x, weight, bias = data(20, 18, 17, seed=5)
    noise = Noise("salt-and-pepper", 0.25, seed=1, step=4)
    first = run(x, weight, bias, "sigmoid", backend, noise)
    second = run(x, weight, bias, "sigmoid", backend, noise)
    other = run(x, weight, bias, "sigmoid", backend, noise.at(5))
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first[0], other[0])


def test_noise_depends_on_the_logical_index_not_the_strides():
    x = uniform_data(seed=4)[:40, :60]
    strided = x.t().contiguous().t()
    noise = Noise("gaussian", 0.2, seed=9, step=1)
    assert strided.stride() != x.stride()
    assert torch.equal(corrupt(strided, noise, "triton"), corrupt(x, noise, "triton"))


def test_counter_uses_the_high_bits_of_int64_offsets():
    # Rows past 2^32 counters must not reuse the numbers of the counter mod 2^32: Philox takes
    # the high 32 bits as a second counter word. With D = 4 row r has counter r.
    @triton.jit
    def uniforms(out_ptr, key, base, BLOCK_B: tl.constexpr):
        rows = base + tl.arange(0, BLOCK_B).to(tl.int64)
        draw = draw_tile(key, rows, 0, 4, False, BLOCK_B, 4)
        offsets = tl.arange(0, BLOCK_B)[:, None] * 4 + tl.arange(0, 4)[None, :]
        tl.store(out_ptr + offsets, draw)

    key = Noise("masking", 0.5).key()
    low, high = torch.empty(16, 4), torch.empty(16, 4)
    uniforms[(1,)](low, key, 5, BLOCK_B=16)
    uniforms[(1,)](high, key, 5 + 2**32, BLOCK_B=16)
    assert (low != high).all()
    assert low.min() >= 0 and low.max() < 1 and len(set(low.flatten().tolist())) == 64


def test_keys_depend_on_seed_step_and_rank_only():
    noise = Noise("masking", 0.3, seed=3, step=4)
    keys = {noise.key(), noise.at(5).key(), Noise("masking", 0.3, seed=4, step=4).key()}
    keys.add(noise.key(rank=1))
    assert len(keys) == 4
    assert noise.key() == Noise("gaussian", 0.1, seed=3, step=4).key()
    for key in keys:
        assert 2**62 <= key < 2**63
    # The functional layer's codes are the kernels' codes.
    assert {kind: Noise(kind, 0.5).kernel_args().code for kind in KINDS} == NOISE_CODES


# The torch path.


@pytest.mark.parametrize("kind,level", KIND_LEVELS, ids=[k for k, _ in KIND_LEVELS])
def test_torch_path_gradients_equal_the_reference_on_its_x_tilde(kind, level):
    x, weight, bias = data(37, 45, 53, seed=6)
    noise = Noise(kind, level, seed=2, step=1)
    got = run(x, weight, bias, "tanh", "torch", noise)
    x_tilde, keep = corrupt(x, noise, "torch", with_derivative=True)
    x_tilde.requires_grad_(True)
    want = list(run(x_tilde, weight, bias, "tanh", "reference"))
    want[4] = want[4] * keep
    assert_matches(got, want)
    assert not torch.equal(x_tilde.detach(), x.detach())


# Memory: corruption saves nothing more.


def saved(run_encode):
    tensors = []

    def pack(tensor):
        tensors.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        h, _ = run_encode()
    return [(tuple(t.shape), t.dtype, t.element_size() * t.numel()) for t in tensors], h


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kind,level", KIND_LEVELS, ids=[k for k, _ in KIND_LEVELS])
def test_bytes_saved_for_backward_do_not_grow_with_corruption(backend, kind, level):
    x, weight, bias = data(24, 20, 18, seed=7)
    clean, _ = saved(lambda: fastae.encode(x, weight, bias, backend=backend))
    noisy, _ = saved(
        lambda: fastae.encode(x, weight, bias, backend=backend, noise=Noise(kind, level))
    )
    assert noisy == clean
    # x, W, h (24 x 18 fp32) and n (18,), plus s (18,) on the torch path: nothing of the size
    # of x~ beyond x itself.
    vectors = 2 if backend == "torch" else 1
    assert sum(size for _, _, size in noisy) == 4 * (24 * 20 + 18 * 20 + 24 * 18 + vectors * 18)


# Without corruption nothing changes.


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_noise_is_the_clean_encoder(backend):
    x, weight, bias = data(21, 19, 17, seed=8)
    default = run(x, weight, bias, "sigmoid", backend)
    explicit = run(x, weight, bias, "sigmoid", backend, None)
    for name, a, b in zip(NAMES, default, explicit, strict=True):
        assert torch.equal(a, b), name
    assert_matches(default, run(x, weight, bias, "sigmoid", "reference"))


# Errors.


@pytest.mark.parametrize(
    "args,message",
    [
        (("speckle", 0.1), r"noise kind: got 'speckle', expected one of gaussian, masking"),
        (("masking", 1.0), r"noise level \(masking fraction\): got 1.0, expected a number"),
        (("salt-and-pepper", 0.0), r"got 0.0, expected a number strictly between 0 and 1"),
        (("gaussian", -0.1), r"noise level \(gaussian sigma\): got -0.1, expected a number > 0"),
        (("gaussian", float("nan")), r"noise level: got nan, expected a finite number"),
        (("masking", 0.1, 1.0, 0.0), r"noise low, high: got \[1.0, 0.0\], expected low < high"),
        (
            ("masking", 0.1, 0.0, 1.0, -1),
            r"noise seed: got -1, expected an integer in \[0, 2\*\*63",
        ),
        (("masking", 0.1, 0.0, 1.0, 0, 2**63), r"noise step: got 9223372036854775808"),
        (("masking", 0.1, 0.0, 1.0, 0, 1.5), r"noise step: got 1.5, expected an integer"),
    ],
)
def test_bad_noise_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        Noise(*args)


def test_encode_refuses_noise_that_is_not_a_noise():
    x, weight, bias = data(3, 4, 5)
    with pytest.raises(TypeError, match=r"noise: got str, expected None or .*Noise"):
        fastae.encode(x, weight, bias, noise="masking:0.3")


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (torch.zeros(3, 4).to_sparse(), TypeError, r"x: got layout torch.sparse_coo, expected"),
        (torch.zeros(3, 4, dtype=torch.int32), TypeError, r"x: got dtype torch.int32"),
        (torch.tensor(1.0), ValueError, r"x: got shape \(\), expected \(B, D\)"),
    ],
)
def test_corrupt_names_a_bad_x(x, error, message):
    with pytest.raises(error, match=message):
        corrupt(x, Noise("masking", 0.3), "torch")


# Across processes: each rank corrupts its own samples with its own stream.


def _rank_main(rank, world, init_file, out_dir, backend):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # The same local batch on both ranks: only the rank in the key tells their noise apart.
        x, weight, bias = data(6, 8, 5, seed=9)
        noise = Noise("masking", 0.4, seed=1, step=2)
        h, _ = fastae.encode(
            x, weight, bias, backend=backend, process_group=dist.group.WORLD, noise=noise
        )
        torch.save(h.detach(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_draw_different_noise():
    # The Triton path (the torch path takes the rank from the same fastae.functional.noise.rank_of);
    # one spawn of two processes costs ~10 s here.
    backend = "triton"
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(2, os.path.join(tmp, "init"), tmp, backend), nprocs=2)
        codes = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]

    x, weight, bias = (t.detach() for t in data(6, 8, 5, seed=9))
    noise = Noise("masking", 0.4, seed=1, step=2)
    for rank, h in enumerate(codes):
        x_tilde = corrupt(x, noise, backend, rank=rank)
        want, _ = fastae.reference.encode(x_tilde, weight, bias)
        torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(codes[0], codes[1])
