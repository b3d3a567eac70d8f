"""The plain-PyTorch token mixers against token-by-token float64 recurrences, outputs and gradients."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import vig
import vig_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_models_find_this_projects_kernels_from_any_directory(tmp_path):
    """A script outside the checkout (as pretrain/mae.py is, under accelerate launch) imports the model and
    its token mixers from the installed package, even where Hugging Face's unrelated ``kernels`` package,
    a dependency of transformers 5, is installed too."""
    code = ("import timm, torch, vig, vig_kernels; print(vig_kernels.__file__); "
            "model = timm.create_model('vig_tiny', num_classes=3, img_size=32); "
            "print(tuple(model(torch.randn(1, 3, 32, 32)).shape))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module_file, shape = proc.stdout.split("\n")[:2]
    assert os.path.dirname(os.path.dirname(module_file)) == ROOT, module_file
    assert shape == "(1, 3)"


def test_from_the_checkout_root_kernels_is_hugging_faces_package_and_transformers_imports():
    """``python -m eval.zeroshot`` from the repository root puts the root on sys.path, where this project's kernels/
    folder would shadow Hugging Face's ``kernels``, which transformers imports when it is installed (the CLIP demo's
    zero-shot step failed so with ``cannot import name 'CUDAProperties' from 'kernels'``)."""
    try:
        installed = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    code = ("import vig_kernels, kernels; print(vig_kernels.__file__); print(kernels.__file__); "
            "import transformers.integrations.hub_kernels")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if installed is None:
        assert proc.returncode != 0 and "imported as vig_kernels" in proc.stderr, proc.stderr[-3000:]
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = proc.stdout.split("\n")[:2]
    assert os.path.dirname(os.path.dirname(ours)) == ROOT, ours
    assert not theirs.startswith(ROOT + os.sep + "kernels"), theirs


def gla_token_loop(q, k, v, g, scale):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``; layout [B, T, H, D]."""
    batch, length, heads, key_dim = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    outputs = []
    for t in range(length):
        state = g[:, t].exp().unsqueeze(-1) * state + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", scale * q[:, t], state))
    return torch.stack(outputs, dim=1)


def bigla_token_loop(q, k, v, g_fwd, g_bwd):
    scale = q.shape[-1] ** -0.5
    backward = gla_token_loop(q.flip(1), k.flip(1), v.flip(1), g_bwd.flip(1), scale).flip(1)
    return (gla_token_loop(q, k, v, g_fwd, scale) + backward) / 2


def random_gla_inputs(length, gate_scale, key_dim=16, value_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, length, 3, key_dim)
    q, k = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, length, 3, value_dim, generator=generator, dtype=torch.float64)
    gates = [F.logsigmoid(gate_scale * torch.randn(shape, generator=generator, dtype=torch.float64)) / 16
             for _ in range(2)]
    return [t.requires_grad_() for t in (q, k, v, *gates)]


@pytest.mark.parametrize("length", [1, 7, 16, 17, 63, 196])
@pytest.mark.parametrize("gate_scale", [0.1, 10.0, 3000.0], ids=["weak", "strong", "extreme"])
def test_bigla_reference_matches_the_recurrence(length, gate_scale):
    inputs = random_gla_inputs(length, gate_scale)
    out_grad = torch.randn(2, length, 3, 8, dtype=torch.float64)
    expected = bigla_token_loop(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs, out_grad)
    out = vig_kernels.bigla_reference(*inputs)
    grads = torch.autograd.grad(out, inputs, out_grad)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for name, grad, expected_grad in zip(("q", "k", "v", "g_fwd", "g_bwd"), grads, expected_grads):
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9, msg=name)


def test_bigla_reference_in_low_precision_stays_close():
    inputs = [t.detach() for t in random_gla_inputs(100, 1.0, key_dim=32, value_dim=64)]
    expected = bigla_token_loop(*inputs)
    for dtype in (torch.float32, torch.bfloat16):
        out = vig_kernels.bigla_reference(*(t.to(dtype) for t in inputs))
        assert out.dtype == dtype
        ratio = (out.double() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
        assert ratio < (1e-6 if dtype == torch.float32 else 5e-3)


def test_bigla_dispatch_validates_inputs():
    q, k, v, g_fwd, g_bwd = (t.detach() for t in random_gla_inputs(5, 1.0))
    with pytest.raises(ValueError, match=r"k has shape \(2, 4, 3, 16\)"):
        vig_kernels.bigla(q, k[:, :4], v, g_fwd, g_bwd)
    with pytest.raises(ValueError, match=r"v has shape .*\[B, T, H\]"):
        vig_kernels.bigla(q, k, v[:, :, :2], g_fwd, g_bwd)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        vig_kernels.bigla(q[0], k, v, g_fwd, g_bwd)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        vig_kernels.set_backend("cuda")
    with vig_kernels.use_backend("reference"):
        torch.testing.assert_close(vig_kernels.bigla(q, k, v, g_fwd, g_bwd), bigla_token_loop(q, k, v, g_fwd, g_bwd))
    assert vig_kernels.get_backend() == "auto"


def scan_token_loop(u, delta, A, B, C, D):
    """Mamba's recurrence, one token at a time: u, delta [b, T, E]; A [E, N]; B, C [b, T, N]; D [E]."""
    state = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    outputs = []
    for t in range(u.shape[1]):
        state = (delta[:, t, :, None] * A).exp() * state + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        outputs.append((state * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("length", [1, 5, 16, 33, 197])
@pytest.mark.parametrize("step_scale", [0.01, 1.0, 50.0], ids=["weak", "strong", "extreme"])
def test_bi_selective_scan_reference_matches_the_recurrence(length, step_scale):
    generator = torch.Generator().manual_seed(length)
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    u, B, C = rand(2, 2, length, 6), rand(2, 2, length, 4), rand(2, 2, length, 4)
    delta = step_scale * torch.rand(2, 2, length, 6, generator=generator, dtype=torch.float64)
    A = -torch.arange(1, 5, dtype=torch.float64).repeat(2, 6, 1) * (1 + rand(2, 6, 4).abs())
    D = rand(2, 6)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D)]
    out_grad = rand(2, length, 6)
    backward = scan_token_loop(u[1].flip(1), delta[1].flip(1), A[1], B[1].flip(1), C[1].flip(1), D[1]).flip(1)
    expected = (scan_token_loop(u[0], delta[0], A[0], B[0], C[0], D[0]) + backward) / 2
    expected_grads = torch.autograd.grad(expected, inputs, out_grad)
    out = vig_kernels.bi_selective_scan(*inputs)
    grads = torch.autograd.grad(out, inputs, out_grad)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for name, grad, expected_grad in zip(("u", "delta", "A", "B", "C", "D"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9, msg=name)


def test_references_take_an_empty_sequence():
    q = torch.zeros(2, 0, 3, 16)
    assert vig_kernels.bigla_reference(q, q, torch.zeros(2, 0, 3, 8), q, q).shape == (2, 0, 3, 8)
    u = torch.zeros(2, 1, 0, 6)
    scan = vig_kernels.bi_selective_scan_reference(u, u, torch.zeros(2, 6, 4), torch.zeros(2, 1, 0, 4),
                                                   torch.zeros(2, 1, 0, 4), torch.zeros(2, 6))
    assert scan.shape == (1, 0, 6)


def test_bi_selective_scan_validates_shapes():
    u = torch.zeros(2, 1, 5, 6)
    with pytest.raises(ValueError, match=r"A must have 3 dims, got shape \(2, 6\)"):
        vig_kernels.bi_selective_scan(u, u, torch.zeros(2, 6), torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4),
                                  torch.zeros(2, 6))


def official_bimamba_v2(mixer: vig.BiMambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """Vim's mixer as the official code computes it: the backward direction runs the causal conv and the
    scan on the flipped sequence (``flip(xz)``), and its output is flipped back before the merge."""
    length = hidden.shape[1]
    x, z = mixer.in_proj(hidden).chunk(2, dim=-1)

    def direction(x, z, conv, x_proj, dt_proj, A_log, D):
        u = F.silu(conv(x.transpose(1, 2))[..., :length]).transpose(1, 2)
        low_rank, B, C = x_proj(u).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        delta = F.softplus(dt_proj(low_rank))
        return scan_token_loop(u, delta, -A_log.exp(), B, C, D) * F.silu(z)

    y_fwd = direction(x, z, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    y_bwd = direction(x.flip(1), z.flip(1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b)
    return mixer.out_proj((y_fwd + y_bwd.flip(1)) / 2)


def test_vim_mixer_matches_the_official_flip_formulation():
    torch.manual_seed(0)
    mixer = vig.BiMambaMixer(dim=8).double()
    hidden = torch.randn(2, 21, 8, dtype=torch.float64)
    torch.testing.assert_close(mixer(hidden), official_bimamba_v2(mixer, hidden), rtol=1e-10, atol=1e-10)


def vig_mixer_formula(mixer: vig.BiGLAMixer, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """architecture.md §2.4 step by step, with the token-loop recurrence."""
    batch, length, dim = x.shape
    heads = mixer.num_heads
    u = F.conv2d(x.transpose(1, 2).reshape(batch, dim, *grid), mixer.in_proj[0].weight, padding=1, groups=dim)
    u = mixer.in_proj[1](u).flatten(2).transpose(1, 2)
    qkv = u @ mixer.qkv_proj.weight.T
    q, k, v = qkv[..., :dim // 2], qkv[..., dim // 2:dim], qkv[..., dim:]
    z = (u @ mixer.gk_proj[0].weight.T) @ mixer.gk_proj[1].weight.T + mixer.gk_proj[1].bias
    g = F.logsigmoid(z) / 16
    split = lambda t: t.reshape(batch, length, heads, -1)  # noqa: E731
    o = bigla_token_loop(split(q), split(k), split(v), split(g[..., :dim // 2]), split(g[..., dim // 2:]))
    rms = lambda t, w: t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w  # noqa: E731
    gate = torch.sigmoid(u @ mixer.g_proj.weight.T + mixer.g_proj.bias).reshape(batch, length, heads, -1)
    y = gate * rms(o, mixer.g_norm.weight) + (1 - gate) * rms(split(u), mixer.l_norm.weight)
    return mixer.out_act(y.reshape(batch, length, dim)) @ mixer.o_proj.weight.T


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_vig_mixer_matches_the_spec_formula(name):
    torch.manual_seed(0)
    model = timm.create_model(name).double()
    mixer = model.blocks[0].attn if name == "vig_tiny" else model.layers[0].blocks[0].op
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    dim = mixer.o_proj.in_features
    x = torch.randn(2, 20, dim, dtype=torch.float64)
    torch.testing.assert_close(mixer(x, (4, 5)), vig_mixer_formula(mixer, x, (4, 5)), rtol=1e-9, atol=1e-9)
