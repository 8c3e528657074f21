"""minicirc.ops: extension and torch reference against dense oracles written here.

The shape of pytorch/extension-cpp's tests: `sample_inputs` yields the op calls (odd sizes, empty and
all-active rows, every dictionary kind, on cpu and on cuda where present), `reference` is the dense torch
computation each must equal, `test_ops_match_reference` asserts it for both paths, and `test_opcheck` runs
torch.library.opcheck on every sample. The tests after those pin single properties (dtypes, ties at the
threshold, chunking, bad rows, the path switch). Every comparison scatters rows to dense first (row order
inside the kernels is not part of the contract beyond "ids increase"), on float64 unless a test is about
another dtype, with random, tie-free inputs. CUDA variants run when a GPU and the CUDA extension are present.
"""
import os
import random
from typing import NamedTuple

import pytest
import torch

from minicirc import ops
from minicirc import rows as rows_module
from minicirc.rows import dense_to_rows, empty_rows, row_ids, rows_to_dense

HAS_CUDA_EXT = torch.cuda.is_available() and ops.cuda_extension_loaded()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
need_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="minicirc._C not built or MINICIRC_NO_EXT=1")


def ext_available(device):
    return ops.extension_loaded() if device == "cpu" else HAS_CUDA_EXT


def paths(device):
    """use_ext values to test on a device: the reference always, the extension where built."""
    return [False] + ([True] if ext_available(device) else [])


# ----------------------------------------------------------------------------- oracles

def dense_encode(x, W_enc, b_enc, b_dec, kind, threshold=None, k=0):
    pre = (x - b_dec) @ W_enc + b_enc
    if kind == "relu":
        return torch.clamp(pre, min=0)
    if kind == "jumprelu":
        return torch.where(pre > threshold, pre, torch.zeros_like(pre))
    keep = pre.argsort(dim=-1, descending=True)[:, :k]  # sort, not topk: independent of ops.activate
    return torch.zeros_like(pre).scatter(-1, keep, pre.gather(-1, keep)).clamp(min=0)


def dense_attribution(g_x, W_dec, f_c, f_p):
    return (g_x @ W_dec.T) * (f_p - f_c)


def sampled_feature_effects(g_x, W_dec, delta, use_ext=None):
    """``(g_x @ W_dec.T) * delta`` for a dense delta (..., n_features) through ops.feature_attribution (delta as
    the patch rows, no clean rows): the attrib / IG node-effect product, as the attribution code forms it."""
    dt = torch.promote_types(torch.promote_types(g_x.dtype, W_dec.dtype), delta.dtype)
    nf = W_dec.shape[0]
    d2 = delta.reshape(-1, nf).to(dt)
    g2 = g_x.reshape(-1, g_x.shape[-1]).to(dt)
    crow, col, val = ops.feature_attribution(g2, W_dec.to(dt), empty_rows(d2.shape[0], dt, d2.device),
                                             dense_to_rows(d2), use_ext=use_ext)
    return rows_to_dense(crow, col, val.to(dt), nf).reshape(delta.shape)


def make_sae(d, s, gen, dtype=torch.float64, device="cpu", fire=0.3):
    """Random SAE whose biases make about `fire` of the features active per token."""
    W_enc = torch.randn(d, s, generator=gen, dtype=dtype) / d ** 0.5
    b_enc = torch.randn(s, generator=gen, dtype=dtype) * 0.1 - torch.special.ndtri(torch.tensor(1 - fire)).to(dtype)
    b_dec = torch.randn(d, generator=gen, dtype=dtype) * 0.1
    theta = torch.randn(s, generator=gen, dtype=dtype) * 0.3  # some negative: f = pre also below 0
    return [t.to(device) for t in (W_enc, b_enc, b_dec, theta)]


def check_rows_form(crow, col, val, n, n_features, stored_zeros=False):
    assert crow.dtype == torch.long and col.dtype == torch.long
    assert crow.shape == (n + 1,) and int(crow[0]) == 0 and int(crow[-1]) == col.numel() == val.numel()
    assert bool((crow.diff() >= 0).all())
    if col.numel():
        assert int(col.min()) >= 0 and int(col.max()) < n_features
        same_row = row_ids(crow)[1:] == row_ids(crow)[:-1]
        assert bool((col.diff()[same_row] > 0).all()), "ids must increase strictly within a row"
        if not stored_zeros:
            assert bool((val != 0).all())


def rand_features(n, s, gen, density, dtype=torch.float64):
    return torch.randn(n, s, generator=gen, dtype=dtype) * (torch.rand(n, s, generator=gen) < density)


# ----------------------------------------------------------------------------- samples, the reference

class Sample(NamedTuple):
    """One call of an op: `args` exactly as `torch.ops.minicirc.<op>` takes them (ops.py's wrappers take the
    same ones), `want` the reference's dense result, `full` the dense shape the rows scatter to."""
    name: str
    op: str             # "sae_encode_sparse" or "feature_attribution"
    args: tuple
    n_features: int


def controlled_rows(d, s, gen, device):
    """An SAE and inputs whose rows are, in turn, empty, all-active, and mixed.

    The last input coordinate feeds every feature with weight 1, so x[n, -1] shifts row n's
    pre-activations as a whole: -100 silences the row, +100 lights every feature.
    """
    W_enc, b_enc, b_dec, theta = make_sae(d, s, gen, device=device)
    W_enc[-1] = 1.0
    b_dec[-1] = 0.0
    x = torch.randn(9, d, generator=gen, dtype=torch.float64).to(device)
    x[:, -1] = torch.tensor([-100.0, 100.0, 0.0] * 3, dtype=torch.float64)
    return x, W_enc, b_enc, b_dec, theta


def attribution_inputs(n, d, s, gen, device):
    """Gradients, decoder and clean/patch features with an empty row (0), all-active rows on clean (1) and
    on patch (2), and a row active on both with no change (3: kept, effect 0)."""
    g = torch.randn(n, d, generator=gen, dtype=torch.float64)
    W = torch.randn(s, d, generator=gen, dtype=torch.float64)
    f_c, f_p = rand_features(n, s, gen, 0.2), rand_features(n, s, gen, 0.2)
    f_c[0], f_p[0] = 0, 0
    f_c[1] = torch.rand(s, generator=gen, dtype=torch.float64) + 0.5
    f_p[2] = -torch.rand(s, generator=gen, dtype=torch.float64) - 0.5
    f_c[3], f_p[3] = f_c[1], f_c[1]
    return (t.to(device) for t in (g, W, f_c, f_p))


def sample_inputs(device, dtype=torch.float64):
    """Every shape and layout the ops are tested on: odd sizes (d 7/65/513, n_features 1/33/4097), each
    dictionary kind the encode takes (relu, jumprelu, topk with k below, at and above n_features, and k=0),
    rows that are empty, all-active or mixed, no rows at all, and attribution inputs with empty, all-active
    and unchanged rows. Inputs are tie-free random draws from fixed generators."""
    def encode(name, x, W_enc, b_enc, b_dec, kind, theta, k):
        args = (x, W_enc, b_enc, b_dec, kind, theta if kind == "jumprelu" else None, k)
        return Sample(name, "sae_encode_sparse", tuple(a.to(dtype) if torch.is_tensor(a) else a for a in args),
                      W_enc.shape[1])

    for d in (7, 65, 513):
        for s in (1, 33, 4097):
            gen = torch.Generator().manual_seed(d * 10007 + s)
            W_enc, b_enc, b_dec, theta = make_sae(d, s, gen, device=device)
            x = torch.randn(19, d, generator=gen, dtype=torch.float64).to(device)
            for kind in ops.KINDS:
                yield encode(f"encode {kind} d={d} s={s}", x, W_enc, b_enc, b_dec, kind, theta, min(s, 5))
    for s in (1, 33, 4097):
        x, W_enc, b_enc, b_dec, theta = controlled_rows(65, s, torch.Generator().manual_seed(s), device)
        for kind, k in [("relu", 0), ("jumprelu", 0), ("topk", s), ("topk", s + 7), ("topk", 3)]:
            yield encode(f"encode {kind} k={k} s={s}, empty/all-active/mixed rows", x, W_enc, b_enc, b_dec, kind,
                         theta, k)
    gen = torch.Generator().manual_seed(4)
    W_enc, b_enc, b_dec, theta = make_sae(7, 33, gen, device=device)
    for kind in ops.KINDS:
        yield encode(f"encode {kind}, no rows", torch.zeros(0, 7, dtype=torch.float64, device=device),
                     W_enc, b_enc, b_dec, kind, theta, 3)
    yield encode("encode topk k=0", torch.randn(5, 7, generator=gen, dtype=torch.float64).to(device),
                 W_enc, b_enc, b_dec, "topk", theta, 0)

    for d in (7, 65, 513):
        for s in (1, 33, 4097):
            g, W, f_c, f_p = attribution_inputs(21, d, s, torch.Generator().manual_seed(d * 31 + s), device)
            rows = [t.to(dtype) if t.is_floating_point() else t
                    for t in (*dense_to_rows(f_c), *dense_to_rows(f_p))]
            yield Sample(f"attribution d={d} s={s}", "feature_attribution", (g.to(dtype), W.to(dtype), *rows), s)
    g, W, f_c, _ = attribution_inputs(21, 7, 33, torch.Generator().manual_seed(8), device)
    none = empty_rows(0, dtype, device)
    yield Sample("attribution, no rows", "feature_attribution",
                 (g[:0].to(dtype), W.to(dtype), *none, *none), 33)
    rows = [t.to(dtype) if t.is_floating_point() else t for t in dense_to_rows(f_c)]
    yield Sample("attribution, no patch", "feature_attribution",
                 (g.to(dtype), W.to(dtype), *rows, *empty_rows(21, dtype, device)), 33)


def reference(sample):
    """The dense torch computation each op must equal (after scattering its rows), written here."""
    if sample.op == "sae_encode_sparse":
        x, W_enc, b_enc, b_dec, kind, theta, k = sample.args
        return dense_encode(x, W_enc, b_enc, b_dec, kind, theta, min(k, sample.n_features))
    g, W, *rows = sample.args
    f_c = rows_to_dense(*rows[:3], sample.n_features)
    f_p = rows_to_dense(*rows[3:], sample.n_features)
    return dense_attribution(g, W, f_c, f_p)


def run(sample, use_ext):
    """The op through its ops.py wrapper, on the path `use_ext` selects."""
    if sample.op == "sae_encode_sparse":
        return ops.sae_encode_sparse(*sample.args, use_ext=use_ext)
    g, W, *rows = sample.args
    return ops.feature_attribution(g, W, rows[:3], rows[3:], use_ext=use_ext)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_match_reference(device):
    """Extension (where built) and torch fallback both equal the reference on every sample, float64."""
    n_samples = 0
    for sample in sample_inputs(device):
        n_samples += 1
        want = reference(sample)
        if sample.op == "feature_attribution":
            f_c, f_p = (rows_to_dense(*r, sample.n_features) for r in (sample.args[2:5], sample.args[5:]))
            union = (f_c != 0) | (f_p != 0)
        for use_ext in paths(device):
            try:
                crow, col, val = run(sample, use_ext)
                check_rows_form(crow, col, val, want.shape[0], sample.n_features,
                                stored_zeros=sample.op == "feature_attribution")
                if sample.op == "feature_attribution":
                    # Rows list exactly the union of the active features, zero effects included.
                    assert torch.equal(rows_to_dense(crow, col, torch.ones_like(val), sample.n_features) != 0,
                                       union)
                tol = 1e-12 if sample.op == "sae_encode_sparse" else 1e-10
                torch.testing.assert_close(rows_to_dense(crow, col, val, sample.n_features), want,
                                           rtol=tol, atol=tol)
            except AssertionError as e:
                raise AssertionError(f"{sample.name} (use_ext={use_ext}): {e}") from None
    assert n_samples == 27 + 15 + 4 + 9 + 2


@pytest.mark.parametrize("device", DEVICES)
def test_samples_cover_empty_and_full_rows(device):
    """The controlled samples really have an empty row 0 and an all-active row 1 (k of them for top-k): the
    layouts sample_inputs promises are there."""
    seen = 0
    for sample in sample_inputs(device):
        want = reference(sample)
        if "empty/all-active" in sample.name:
            kind, k = sample.args[4], sample.args[6]
            counts = (want != 0).sum(1)
            full = min(k, sample.n_features) if kind == "topk" else sample.n_features
            assert int(counts[0]) == 0 and int(counts[1]) == full, sample.name
            seen += 1
    assert seen == 15


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(device, dtype):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) on every sample."""
    if not ext_available(device):
        pytest.skip("extension not built for this device")
    for sample in sample_inputs(device, dtype):
        if (device == "cuda" and sample.op == "sae_encode_sparse" and sample.args[4] == "topk"
                and min(sample.args[6], sample.n_features) > ops._CUDA_TOPK_MAX_K):
            continue    # the CUDA kernel refuses such k by contract; ops.sae_encode_sparse runs the reference
        try:
            torch.library.opcheck(getattr(torch.ops.minicirc, sample.op), sample.args)
        except Exception as e:
            raise AssertionError(f"{sample.name}: {e}") from e


@pytest.mark.parametrize("device", DEVICES)
def test_topk_more_than_positive(device):
    """k beyond the number of positive pre-activations: only the positives are active."""
    gen = torch.Generator().manual_seed(3)
    W_enc, b_enc, b_dec, _ = make_sae(33, 257, gen, device=device, fire=0.02)
    x = torch.randn(31, 33, generator=gen, dtype=torch.float64).to(device)
    pre = (x - b_dec) @ W_enc + b_enc
    k = int((pre > 0).sum(1).max()) + 5
    for use_ext in paths(device):
        crow, col, val = ops.sae_encode_sparse(x, W_enc, b_enc, b_dec, "topk", None, k, use_ext=use_ext)
        assert torch.equal(crow.diff(), (pre > 0).sum(1))
        torch.testing.assert_close(rows_to_dense(crow, col, val, 257), pre.clamp(min=0))


@pytest.mark.parametrize("device", DEVICES)
def test_encode_float32_and_bfloat16(device):
    gen = torch.Generator().manual_seed(5)
    W_enc, b_enc, b_dec, theta = [t.float() for t in make_sae(65, 4097, gen, device=device)]
    x = torch.randn(23, 65, generator=gen).to(device)
    # float32 sums in another order (cuBLAS, the CUDA tile) may put a pre-activation within rounding of a
    # decision point on the other side: compare away from 0, the threshold and the top-k cut (1e-4 margin).
    pre = (x.double() - b_dec.double()) @ W_enc.double() + b_enc.double()
    kth = pre.sort(dim=-1, descending=True).values[:, 15:17]
    near = {"relu": pre.abs() < 1e-4, "jumprelu": (pre - theta.double()).abs() < 1e-4,
            "topk": (pre.abs() < 1e-4) | ((pre[..., None] - kth[:, None]).abs() < 1e-4).any(-1)}
    for use_ext in paths(device):
        for kind in ops.KINDS:
            want = dense_encode(x, W_enc, b_enc, b_dec, kind, theta, 16)
            rows = ops.sae_encode_sparse(x, W_enc, b_enc, b_dec, kind, theta, 16, use_ext=use_ext)
            assert rows[2].dtype == torch.float32
            got, far = rows_to_dense(*rows, 4097), ~near[kind]
            assert far.float().mean() > 0.99
            torch.testing.assert_close(got[far], want[far], rtol=1e-4, atol=1e-4)
        # bf16 inputs: the kernel accumulates in float32, so it equals the float32 encode of
        # the bf16-rounded inputs up to the final rounding of the values.
        xb, Wb, beb, bdb = (t.bfloat16() for t in (x, W_enc, b_enc, b_dec))
        want = dense_encode(*(t.double() for t in (xb, Wb, beb, bdb)), "relu")
        rows = ops.sae_encode_sparse(xb, Wb, beb, bdb, "relu", use_ext=use_ext)
        assert rows[2].dtype == torch.bfloat16
        got = rows_to_dense(*rows, 4097).double()
        assert ((got != 0) != (want != 0)).float().mean() < 1e-3  # bf16 rounding of pre near 0
        torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


# ----------------------------------------------------------------------------- feature_attribution

@need_ext
def test_attribution_rejects_bad_rows():
    g, W = torch.randn(2, 5), torch.randn(9, 5)
    ok = (torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.randn(2))
    for bad_col in ([4, 3], [3, 9], [-1, 2]):
        bad = (torch.tensor([0, 2, 2]), torch.tensor(bad_col), torch.randn(2))
        with pytest.raises(RuntimeError, match="column ids"):
            ops.feature_attribution(g, W, ok, bad, use_ext=True)
    with pytest.raises(RuntimeError, match="crow"):
        ops.feature_attribution(g, W, ok, (torch.tensor([0, 2, 1]), torch.tensor([1]), torch.randn(1)), use_ext=True)
    with pytest.raises(RuntimeError, match="crow"):
        ops.feature_attribution(g, W, ok, (torch.tensor([0, 1]), torch.tensor([1]), torch.randn(1)), use_ext=True)


# ----------------------------------------------------------------------------- sampled_feature_effects

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 7, 33), (3, 5, 65, 4097), (17, 513, 1)])
def test_sampled_feature_effects(device, dtype, shape):
    *lead, d, s = shape
    gen = torch.Generator().manual_seed(sum(shape))
    g = torch.randn(*lead, d, generator=gen).to(device, dtype)
    W = torch.randn(s, d, generator=gen).to(device, dtype)
    delta = (torch.randn(*lead, s, generator=gen) * (torch.rand(*lead, s, generator=gen) < 0.1)).to(device, dtype)
    want = (g.double() @ W.double().T) * delta.double()
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.1}[dtype]
    for use_ext in [None] + paths(device):
        got = sampled_feature_effects(g, W, delta, use_ext=use_ext)
        assert got.shape == delta.shape and got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_sampled_feature_effects_ignores_autograd():
    g = torch.randn(4, 7, requires_grad=True)
    W = torch.randn(9, 7, dtype=torch.float64)
    delta = torch.randn(4, 9, dtype=torch.float64)
    out = sampled_feature_effects(g, W, delta)
    assert out.dtype == torch.float64 and not out.requires_grad
    torch.testing.assert_close(out, (g.detach().double() @ W.T) * delta)


# ----------------------------------------------------------------------------- randomized equivalence

def test_randomized_equivalence_1000_draws():
    """1000 small random problems: extension (where built) and reference both equal the oracle."""
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    use = paths("cpu")
    for _ in range(1000):
        n, d, s = rng.randint(0, 9), rng.randint(1, 20), rng.randint(1, 40)
        kind = rng.choice(ops.KINDS)
        k = rng.randint(0, s + 3)
        W_enc, b_enc, b_dec, theta = make_sae(d, s, gen, fire=rng.choice([0.05, 0.3, 0.9]))
        x, x_p = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
        g = torch.randn(n, d, generator=gen, dtype=torch.float64)
        W_dec = torch.randn(s, d, generator=gen, dtype=torch.float64)
        f_c = dense_encode(x, W_enc, b_enc, b_dec, kind, theta, min(k, s))
        f_p = dense_encode(x_p, W_enc, b_enc, b_dec, kind, theta, min(k, s))
        want = dense_attribution(g, W_dec, f_c, f_p)
        for use_ext in use:
            rc = ops.sae_encode_sparse(x, W_enc, b_enc, b_dec, kind, theta, k, use_ext=use_ext)
            rp = ops.sae_encode_sparse(x_p, W_enc, b_enc, b_dec, kind, theta, k, use_ext=use_ext)
            torch.testing.assert_close(rows_to_dense(*rc, s), f_c, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(rows_to_dense(*rp, s), f_p, rtol=1e-12, atol=1e-12)
            out = ops.feature_attribution(g, W_dec, rc, rp, use_ext=use_ext)
            torch.testing.assert_close(rows_to_dense(*out, s), want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- registration, switches

def test_extension_built():
    """The C++ extension is built on every machine with torch >= 2.10 (setup.py)."""
    if os.environ.get("MINICIRC_NO_EXT") == "1":
        pytest.skip("MINICIRC_NO_EXT=1")
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 10):
        pytest.skip("torch < 2.10: no stable ABI, reference path only")
    assert ops.extension_loaded()


def test_no_ext_switch(monkeypatch):
    monkeypatch.setenv("MINICIRC_NO_EXT", "1")
    assert not ops.extension_loaded()
    x, W = torch.randn(3, 4), torch.randn(4, 5)
    rows = ops.sae_encode_sparse(x, W, torch.zeros(5), torch.zeros(4), "relu")
    torch.testing.assert_close(rows_to_dense(*rows, 5), (x @ W).relu())
    with pytest.raises(RuntimeError, match="not available"):
        ops.sae_encode_sparse(x, W, torch.zeros(5), torch.zeros(4), "relu", use_ext=True)


def test_bad_arguments():
    x, W = torch.randn(3, 4), torch.randn(4, 5)
    with pytest.raises(ValueError, match="unknown SAE kind"):
        ops.sae_encode_sparse(x, W, torch.zeros(5), torch.zeros(4), "gelu")
    if ops.extension_loaded():
        with pytest.raises(RuntimeError, match="threshold"):
            torch.ops.minicirc.sae_encode_sparse(x, W, torch.zeros(5), torch.zeros(4), "jumprelu", None, 0)
        with pytest.raises(RuntimeError, match="W_enc"):
            torch.ops.minicirc.sae_encode_sparse(x, W.T.contiguous(), torch.zeros(5), torch.zeros(4), "relu", None, 0)


# ----------------------------------------------------------------------------- the attribution core
@pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not built")
@pytest.mark.parametrize("method", ["attrib", "ig"])
def test_node_effects_same_with_and_without_extension(method):
    import minicirc
    from minicirc.attribution import reference as attribution
    from minicirc.attribution import nodes as attribution_nodes
    from minicirc.data import Batch
    from test_attribution import dense_effects
    torch.manual_seed(int(torch.randint(0, 10**6, ()).item()))
    model = minicirc.GPTNeoX(minicirc.Config(vocab_size=30, d_model=16, n_layers=2, n_heads=2, d_mlp=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    saes = {s: minicirc.Dictionary(torch.randn(16, 37), torch.randn(37) * 0.3, torch.randn(37, 16) / 4,
                                   torch.randn(16) * 0.1, "relu") for s in model.sites}
    B, T = 3, 4
    batch = Batch(torch.randint(0, 30, (B, T)), torch.randint(0, 30, (B, T)), torch.randint(0, 30, (B,)),
                  torch.randint(0, 30, (B,)), torch.full((B,), T - 1), [None] * B)
    run = lambda ext: dense_effects(attribution_nodes.node_effects(model, saes, attribution.logit_diff, batch, method,
                                                                  4, use_ext=ext))  # (B, T, F + 1): the error last
    with_ext, without = run(True), run(False)
    for s in model.sites:
        assert (with_ext[s][..., :-1] != 0).any()
        torch.testing.assert_close(with_ext[s][..., :-1], without[s][..., :-1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(with_ext[s][..., -1], without[s][..., -1], rtol=0, atol=0)


# ----------------------------------------------------------------------------- gaps found by mutation testing

def test_rows_helpers_against_a_loop():
    n, s = 7, 11
    dense = torch.randn(n, s, dtype=torch.float64) * (torch.rand(n, s) < 0.4)
    dense[0], dense[-1] = 0, 0   # empty first and last rows
    crow, col, val = dense_to_rows(dense)
    want_col, want_val, want_crow = [], [], [0]
    for r in range(n):
        for c in range(s):
            if dense[r, c] != 0:
                want_col.append(c)
                want_val.append(dense[r, c].item())
        want_crow.append(len(want_col))
    assert crow.tolist() == want_crow and col.tolist() == want_col and val.tolist() == want_val
    assert row_ids(crow).tolist() == [r for r in range(n) for _ in range(want_crow[r + 1] - want_crow[r])]
    back = rows_to_dense(crow, col, val, s)
    assert back.dtype == torch.float64 and torch.equal(back, dense)
    e = empty_rows(n, torch.float64)
    assert e[0].tolist() == [0] * (n + 1) and e[1].numel() == 0 and e[2].dtype == torch.float64


@pytest.mark.parametrize("use_ext", paths("cpu"))
def test_jumprelu_at_exactly_the_threshold_is_off(use_ext):
    """pre == threshold exactly must give 0 (strict >); the random tests never hit equality. W_enc is a
    permutation and the biases are 0, so pre is x permuted, exactly."""
    d = 37
    perm = torch.randperm(d)
    W_enc = torch.eye(d, dtype=torch.float64)[:, perm]
    theta = torch.rand(d, dtype=torch.float64) + 0.5
    zeros = torch.zeros(d, dtype=torch.float64)
    x = torch.zeros(3, d, dtype=torch.float64)
    x[0, perm] = theta                                      # pre == theta everywhere
    x[1, perm] = torch.nextafter(theta, theta + 1)          # one ulp above: all active
    x[2, perm] = torch.where(torch.rand(d) < 0.5, theta, theta + 0.25)
    pre = x @ W_enc
    assert torch.equal(pre[0], theta)
    want = torch.stack([zeros, pre[1], torch.where(pre[2] == theta, zeros, pre[2])])
    crow, col, val = ops.sae_encode_sparse(x, W_enc, zeros, zeros, "jumprelu", theta, use_ext=use_ext)
    assert crow.diff().tolist() == [0, d, int((x[2, perm] != theta).sum())]
    assert torch.equal(rows_to_dense(crow, col, val, d), want)
    assert torch.equal(ops.activate(pre, "jumprelu", theta), want)


def test_activate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown SAE kind 'gelu'"):
        ops.activate(torch.randn(2, 3), "gelu")


@pytest.mark.parametrize("chunk", ["one row", "three rows"])
def test_reference_encode_across_chunks(monkeypatch, chunk):
    """The reference encodes a few rows at a time; the real chunk (4M elements) exceeds every test shape,
    so shrink it: chunks of 1 and of 3 rows (10 rows: the last chunk is short), with the last row of
    chunks empty (x[:, -1] = -100 silences a row) and an all-active row."""
    d, s, n = 9, 33, 10
    W_enc, b_enc, b_dec, theta = make_sae(d, s, torch.default_generator)
    W_enc[-1], b_dec[-1] = 1.0, 0.0
    x = torch.randn(n, d, dtype=torch.float64)
    x[[2, 5, 8, 9], -1] = -100.0
    x[3, -1] = 100.0
    monkeypatch.setattr(rows_module, "CHUNK_ELEMS", 5 if chunk == "one row" else 3 * s + 5)
    for kind, k in [("relu", 0), ("jumprelu", 0), ("topk", 4)]:
        want = dense_encode(x, W_enc, b_enc, b_dec, kind, theta, k)
        assert (want[[2, 5, 8, 9]] == 0).all() and (want[3] != 0).sum() == (4 if kind == "topk" else s)
        rows = ops.sae_encode_sparse(x, W_enc, b_enc, b_dec, kind, theta, k, use_ext=False)
        check_rows_form(*rows, n, s)
        torch.testing.assert_close(rows_to_dense(*rows, s), want, rtol=1e-12, atol=1e-12)


def test_use_ext_selects_the_path(monkeypatch):
    """use_ext=False must run the torch reference even where the extension is built (the tests that compare
    both paths with an oracle would otherwise test the extension twice); True must not."""
    calls = []
    for name in ("_encode_reference", "_attribution_reference"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x, W = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    b_enc, b_dec = torch.randn(5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for use_ext in paths("cpu"):
        calls.clear()
        rows = ops.sae_encode_sparse(x, W, b_enc, b_dec, "relu", use_ext=use_ext)
        ops.feature_attribution(x, W.T, rows, empty_rows(3, torch.float64), use_ext=use_ext)
        assert calls == ([] if use_ext else ["_encode_reference", "_attribution_reference"])
        torch.testing.assert_close(rows_to_dense(*rows, 5), dense_encode(x, W, b_enc, b_dec, "relu"))
    # Only cpu and cuda have kernels: on another device the extension is never claimed.
    assert ops._use_ext(torch.device("meta"), None) is False
    with pytest.raises(RuntimeError, match="not available for meta"):
        ops._use_ext(torch.device("meta"), True)


@pytest.mark.parametrize("use_ext", paths("cpu"))
def test_mixed_dtypes_promote(use_ext):
    """Mixed-precision arguments are computed in the promoted dtype: float32 x with float64 weights gives the
    float64 result rounded once to float32 (x's dtype), within 1 ulp; float32 gradients with a float64
    decoder give float64 effects."""
    d, s, n = 257, 45, 11
    W_enc, b_enc, b_dec, theta = make_sae(d, s, torch.default_generator)
    x = torch.randn(n, d)
    for kind, th in [("relu", None), ("jumprelu", theta.float())]:   # a float32 threshold, float64 pre
        want = dense_encode(x.double(), W_enc, b_enc, b_dec, kind, theta.float().double())
        crow, col, val = ops.sae_encode_sparse(x, W_enc, b_enc, b_dec, kind, th, use_ext=use_ext)
        assert val.dtype == torch.float32
        got = rows_to_dense(crow, col, val, s)
        assert torch.equal(got != 0, want != 0)
        # float32 arithmetic would be ~1e-6 off on these sums of 257 terms; one rounding is within 2**-24.
        torch.testing.assert_close(got.double(), want, rtol=2.0 ** -23, atol=1e-12)
    g, W_dec = torch.randn(n, d), torch.randn(s, d, dtype=torch.float64)
    f_c, f_p = rand_features(n, s, torch.default_generator, 0.3, torch.float32), \
        rand_features(n, s, torch.default_generator, 0.3, torch.float32)
    crow, col, val = ops.feature_attribution(g, W_dec, dense_to_rows(f_c), dense_to_rows(f_p),
                                             use_ext=use_ext)
    assert val.dtype == torch.float64
    want = dense_attribution(g.double(), W_dec, f_c.double(), f_p.double())
    torch.testing.assert_close(rows_to_dense(crow, col, val, s), want, rtol=1e-12, atol=1e-12)
    # sampled_feature_effects promotes over all three arguments, delta included.
    delta = (f_p - f_c).double()
    got = sampled_feature_effects(g, W_dec.float(), delta, use_ext=use_ext)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, (g.double() @ W_dec.float().double().T) * delta, rtol=1e-12, atol=1e-12)
    # 16-bit inputs are computed in float32 on CPU and returned in their own dtype.
    gb, Wb = g.bfloat16(), W_dec.bfloat16()
    crow, col, val = ops.feature_attribution(gb, Wb, dense_to_rows(f_c.bfloat16()),
                                             dense_to_rows(f_p.bfloat16()), use_ext=use_ext)
    assert val.dtype == torch.bfloat16
    want = dense_attribution(gb.double(), Wb.double(), f_c.bfloat16().double(), f_p.bfloat16().double())
    torch.testing.assert_close(rows_to_dense(crow, col, val, s).double(), want, rtol=1e-2, atol=1e-2)
