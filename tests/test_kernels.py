"""The Triton step tail (``ddfm_fast.kernels.em_tail``) against the plain-torch oracle and the official goldens.

On a CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported);
with TRITON_INTERPRET=0 (conftest only sets it when it is unset) and a CUDA device they run the compiled kernels;
the tolerances were measured on the CPU and are unverified against cuFFT.

Tolerances. The kernels do the oracle's elementwise operations in the oracle's order with IEEE rounding
(``div_rn``, ``sqrt_rn``, no FMA contraction, the colour transform emulated exactly as ``color.py``), so the
only sources of difference are:
  * the collapsed FFT: one rfft2 of ``Y - X + D1^T F1 + D2^T F2`` instead of three complex fft2, so H rounds
    differently at the ulp level of the spectrum (|H| <~ 2);
  * the tau means: float64 sums of float32 terms instead of torch's float32 mean.
Measured over em_onestep.npz (6 cases x 3 steps), kernels vs the torch oracle: F <= 3.0e-7, H <= 4.8e-7,
F1/F2 <= 2.4e-9 abs; C, D <= 2.4e-7 relative; tau <= 2.6e-7 relative (2-3 float32 ulp). Kernels vs the goldens:
F <= 3.6e-7, H <= 4.8e-7, F1/F2 <= 2.4e-9, C/D <= 1.5e-5 relative, tau <= 2.6e-7 relative (the oracle itself is
F <= 3e-7, H <= 4.2e-7, C/D <= 1.1e-5 from them, tests/test_em.py). The bounds below are ~3x these; against the
goldens we keep test_em.py's (F 1e-6, H 1.5e-6, C/D 4e-5 relative), and tau gets 8e-7 relative in both.
case5 feeds F back as the next f_pre, and C ~ 1/|I - f_pre| turns a 3e-7 difference in F into a 1e-4 relative
one where I ~ f_pre (measured C 1.1e-4, D 2.6e-5 vs the oracle). There C and D are compared through their
reciprocals 1/C = |I - f_pre + 1e-6| sqrt(tau_a / 2) and 1/D = sqrt((X^2 + 1e-6) tau_b / 2) (or 1/(2C) where
clamped), which are Lipschitz in f_pre: measured <= 2.1e-7 abs, bound 6e-7 (plus the relative C/D bound).
The sampler's per-step tail, fed the golden x_t and eps, matches the goldens to 4.8e-7 (bound 2e-6); a whole
10-step run with the tiny UNet uses the README's end-to-end atol 1e-3 (the UNet itself differs by ~1e-5 per call).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton step-tail kernels are not tested")

import ddfm_fast  # noqa: E402
from ddfm_fast.config import AccelConfig, ConfigError, SamplerConfig  # noqa: E402
from ddfm_fast.plan import plan, triton_not_supported_reasons  # noqa: E402
from ddfm_fast.em import em_init, em_step  # noqa: E402
from ddfm_fast.kernels import em_tail  # noqa: E402
from ddfm_fast.kernels.em_tail import TailWorkspace, em_step_triton, step_tail_triton  # noqa: E402
from ddfm_fast.sampler import DDFMSampler  # noqa: E402
from ddfm_fast.step import step_tail_torch  # noqa: E402
from ddfm_fast.schedule import Schedule  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    if not em_tail.INTERPRETED:
        pytest.skip("ddfm_fast.kernels.em_tail was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: nowhere to run the Triton kernels",
                allow_module_level=True)

CASES = [f"case{i}" for i in range(6)]
STATE = ("C", "D", "F1", "F2", "H")
ATOL_ORACLE = {"F": 1e-6, "H": 1.5e-6, "F1": 1e-8, "F2": 1e-8, "x_prev": 1.5e-6, "x0": 1.5e-6}
RTOL_CD_ORACLE = 1e-6
ATOL_GOLDEN = {"F": 1e-6, "H": 1.5e-6, "F1": 1e-8, "F2": 1e-8}
RTOL_CD_GOLDEN = 4e-5
RTOL_TAU = 8e-7
ATOL_RECIP = 6e-7  # reciprocals of C and D where F is fed back (see the module docstring)
TABLE = Schedule.create(10).table(DEVICE)


def _t(golden, key):
    return torch.from_numpy(golden[key]).to(DEVICE)


def _close(ours, ref, name, *, atol=0.0, rtol=0.0):
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _close_cd(ours, ref, name, rtol, feedback=False):
    """C and D relative; with fed-back f_pre through the reciprocals (module docstring)."""
    if feedback:
        _close(1 / ours, 1 / ref, name, atol=ATOL_RECIP, rtol=rtol)
    else:
        _close(ours, ref, name, rtol=rtol)


def _compare_states(tri, ref, tag, feedback=False):
    for name in STATE:
        if name in ("C", "D"):
            _close_cd(getattr(tri, name), getattr(ref, name), f"{tag} {name}", RTOL_CD_ORACLE, feedback)
        else:
            _close(getattr(tri, name), getattr(ref, name), f"{tag} {name}", atol=ATOL_ORACLE[name])
    for name in ("tau_a", "tau_b"):
        _close(getattr(tri, name), getattr(ref, name), f"{tag} {name}", rtol=RTOL_TAU)


def _sources(B, H, W, seed=0):
    """Smooth fields plus an edge and noise in [-1, 1], like the golden inputs."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 3, H), torch.linspace(0, 4, W), indexing="ij")
    base = torch.sin(yy + xx)[None, None] * 0.6 + (xx > 2).float() * 0.3
    I = (base + 0.05 * torch.randn(B, 1, H, W, generator=g)).clamp(-1, 1)  # noqa: E741
    V = (torch.cos(2 * yy - xx)[None, None] * 0.7 + 0.05 * torch.randn(B, 1, H, W, generator=g)).clamp(-1, 1)
    x = torch.randn(B, 3, H, W, generator=g)
    eps = 0.9 * x + 0.3 * torch.randn(B, 3, H, W, generator=g)
    return I.to(DEVICE), V.to(DEVICE), x.to(DEVICE), eps.to(DEVICE)


def _tail_chain(I, V, x, eps, steps=3, tau_reduce="batch", **tv):  # noqa: E741
    """Runs the torch and Triton tails side by side from the same inputs; yields both results per step."""
    ref_state, tri_state = em_init(I), em_init(I)
    ws = TailWorkspace.create(I)
    for j in range(steps):
        ref = step_tail_torch(x, eps, TABLE.coef[j], I, V, ref_state,
                              SamplerConfig(steps=10, tau_reduce=tau_reduce, **tv))
        tri = step_tail_triton(x, eps, TABLE.coef[j], I, V, tri_state, lamb=0.5, rho=0.001, tau_reduce=tau_reduce,
                               workspace=ws, **tv)
        yield j, ref, ref_state, tri, tri_state
        x, eps = ref[0], 0.5 * eps + 0.2 * ref[1]  # next step from the oracle's output, as a loop would


# --------------------------------------------------------------------------------- EM step alone: goldens


@pytest.mark.parametrize("case", CASES)
def test_em_chain_matches_oracle_and_goldens(em_golden, case):
    """EM_Initial + 3 chained EM steps (kernels A, FFT, B, tau) vs the torch oracle and em_onestep.npz."""
    I, V = _t(em_golden, f"{case}/in/I"), _t(em_golden, f"{case}/in/V")  # noqa: E741
    lamb, rho = float(em_golden[f"{case}/param/lamb"]), float(em_golden[f"{case}/param/rho"])
    ref_state, tri_state = em_init(I), em_init(I)
    ws = TailWorkspace.create(I, rgb=False)
    f_ref = f_tri = _t(em_golden, f"{case}/in/f_pre_step1")
    for step in (1, 2, 3):
        key = f"{case}/in/f_pre_step{step}"
        feedback = key not in em_golden  # case5 feeds F back (its later f_pre are not stored)
        if not feedback:
            f_ref = f_tri = _t(em_golden, key)
        F_ref, _ = em_step(f_ref, I, V, ref_state, lamb, rho)
        F_tri, _ = em_step_triton(f_tri, I, V, tri_state, lamb, rho, workspace=ws)
        tag = f"{case} step{step}"
        _close(F_tri, F_ref, f"{tag} F vs oracle", atol=ATOL_ORACLE["F"])
        _compare_states(tri_state, ref_state, f"{tag} vs oracle", feedback=step > 1 and case == "case5")
        golden = {"F": F_tri, **{n: getattr(tri_state, n) for n in STATE}}
        for name, ours in golden.items():
            gkey = f"{case}/out/{name}_step{step}"
            if gkey not in em_golden:
                continue  # case5 stores fewer state arrays (see em_onestep.npz)
            if name in ("C", "D"):
                _close_cd(ours, _t(em_golden, gkey), gkey, RTOL_CD_GOLDEN, feedback=case == "case5")
            else:
                _close(ours, _t(em_golden, gkey), gkey, atol=ATOL_GOLDEN[name])
        for name in ("tau_a", "tau_b"):
            ref = float(em_golden[f"{case}/out/{name}_step{step}"])
            ours = getattr(tri_state, name).cpu()
            assert torch.all(ours == ours.flatten()[0]), "batch mode holds one tau for the whole batch"
            assert float(ours.flatten()[0]) == pytest.approx(ref, rel=RTOL_TAU, abs=0), f"{tag} {name}"
        f_ref, f_tri = F_ref, F_tri.clone()  # the workspace's F is overwritten by the next call


# ------------------------------------------------------------------------ the sampler's tail: goldens


def test_step_tail_matches_sampler_goldens(sampler_golden):
    """The 10-step run's tails, fed the golden x_t and UNet eps: x_prev, x0', tau against the goldens."""
    g = sampler_golden
    I, V = _t(g, "I"), _t(g, "V")  # noqa: E741
    ref_state, tri_state = em_init(I), em_init(I)
    ws = TailWorkspace.create(I)
    for j in range(10):
        x, eps = _t(g, "ddim10/x_t")[j:j + 1], _t(g, "ddim10/model_eps")[j:j + 1]
        ref = step_tail_torch(x, eps, TABLE.coef[j], I, V, ref_state, SamplerConfig(steps=10, tau_reduce="batch"))
        x_prev, x0 = step_tail_triton(x, eps, TABLE.coef[j], I, V, tri_state, lamb=0.5, rho=0.001, workspace=ws)
        _close(x_prev, ref[0], f"step {j} x_prev vs oracle", atol=ATOL_ORACLE["x_prev"])
        _close(x0, ref[1], f"step {j} x0 vs oracle", atol=ATOL_ORACLE["x0"])
        _compare_states(tri_state, ref_state, f"step {j} vs oracle")
        _close(x_prev, _t(g, "ddim10/x_prev")[j:j + 1], f"step {j} x_prev vs golden", atol=2e-6)
        _close(x0, _t(g, "ddim10/pred_xstart_after_em")[j:j + 1], f"step {j} x0' vs golden", atol=2e-6)
        for name in ("tau_a", "tau_b"):
            assert getattr(tri_state, name).item() == pytest.approx(float(g[f"ddim10/{name}"][j]), rel=RTOL_TAU)


class _ReplayUNet(torch.nn.Module):
    """Stands in for the tiny UNet: returns the golden UNet output of the step whose timestep it is given."""

    def __init__(self, golden):
        super().__init__()
        self.out = torch.cat([_t(golden, "ddim10/model_eps"), _t(golden, "ddim10/model_var_values")], dim=1)
        self.model_t = golden["ddim10/model_t"].tolist()

    def forward(self, x, t):
        return self.out[self.model_t.index(int(t[0])):][:1].expand(x.shape[0], -1, -1, -1)


def test_sampler_triton_path_with_golden_eps(sampler_golden):
    """DDFMSampler.sample with backend='triton' (workspace, ping-pong buffers, dispatch) without the UNet's cost.

    The replayed eps are the golden ones but x_t is the loop's own, so ulp differences carry from step to step
    and the E-step amplifies them where I ~ f_pre: measured over the 10 steps, the Triton loop is within 1.3e-6
    of the torch loop, and both are within 6.8e-6 of the goldens (x0' at step 1). Bounds: ~3x.
    """
    g = sampler_golden
    runs = {}
    for backend in ("torch", "triton"):
        records = []

        def record(out, records=records):
            records.append((out.pred_xstart.clone(), out.x_prev.clone()))

        sampler = DDFMSampler(SamplerConfig(steps=10, tau_reduce="batch"), AccelConfig(backend=backend))
        result = sampler.sample(_ReplayUNet(g), _t(g, "x_start"), _t(g, "I"), _t(g, "V"), callback=record)
        assert result.plan.backend == backend
        runs[backend] = records + [(result.sample,)]
    for j, (tri, ref) in enumerate(zip(runs["triton"][:-1], runs["torch"][:-1])):
        for name, ours, oracle, key in zip(("x0'", "x_prev"), tri, ref, ("pred_xstart_after_em", "x_prev")):
            _close(ours, oracle, f"step {j} {name} vs torch loop", atol=4e-6)
            _close(ours, _t(g, f"ddim10/{key}")[j:j + 1], f"step {j} {name} vs golden", atol=2e-5)
    _close(runs["triton"][-1][0], _t(g, "ddim10/final"), "final", atol=2e-5)


@pytest.fixture(scope="module")
def tiny(reference_dir):
    return ddfm_fast.load_model(reference_dir / "tiny_unet.pt", config=reference_dir / "tiny_unet_config.json").to(
        DEVICE)


@pytest.mark.slow
def test_sampler_with_triton_backend_matches_goldens(tiny, sampler_golden):
    """A whole 10-step DDFM run with the tiny UNet and backend='triton': intermediates and result (atol 1e-3).

    Marked slow: the 10 UNet calls dominate (0.13 s each on an idle 2-core CPU, several times that on a loaded
    one); the interpreted tails add ~2.5 s. test_sampler_triton_path_with_golden_eps covers the same code path
    without the UNet.
    """
    g = sampler_golden
    records = []

    def record(out):
        records.append((out.pred_xstart.clone(), out.x_prev.clone(), out.state.tau_a.flatten()[0].item()))

    sampler = DDFMSampler(SamplerConfig(steps=10, tau_reduce="batch"), AccelConfig(backend="triton"))
    result = sampler.sample(tiny, _t(g, "x_start"), _t(g, "I"), _t(g, "V"), callback=record)
    assert result.plan.backend == "triton"
    for j, (x0, x_prev, tau_a) in enumerate(records):
        _close(x0, _t(g, "ddim10/pred_xstart_after_em")[j:j + 1], f"step {j} x0'", atol=1e-3)
        _close(x_prev, _t(g, "ddim10/x_prev")[j:j + 1], f"step {j} x_prev", atol=1e-3)
        assert tau_a == pytest.approx(float(g["ddim10/tau_a"][j]), rel=1e-4)
    _close(result.sample, _t(g, "ddim10/final"), "final", atol=1e-3)


# ----------------------------------------------------------------------------- shapes, batch, options


@pytest.mark.parametrize("shape", [(1, 37, 53), (1, 2, 2), (1, 2, 40), (1, 24, 2)], ids=str)
def test_odd_shapes_match_oracle(shape):
    I, V, x, eps = _sources(*shape)  # noqa: E741
    for j, ref, ref_state, tri, tri_state in _tail_chain(I, V, x, eps):
        _close(tri[0], ref[0], f"{shape} step {j} x_prev", atol=ATOL_ORACLE["x_prev"])
        _close(tri[1], ref[1], f"{shape} step {j} x0", atol=ATOL_ORACLE["x0"])
        _compare_states(tri_state, ref_state, f"{shape} step {j}")


def test_small_tiles_give_the_same_result():
    """GPU-like small tiles (many programs, ragged edges): neighbours across tile borders, the circular F1/F2
    wrap, and tau sums over many tiles and two images. Kernels A and B are elementwise, so bitwise equal; the
    tau sums only change their order (float64, measured equal). Kept small: ~70 ms per interpreted program."""
    I, V, x, eps = _sources(2, 11, 19, seed=5)  # noqa: E741
    results = []
    for tiles in (None, em_tail.TileConfig(4, 8, 1, 1)):
        ws = TailWorkspace.create(I, tiles=tiles)
        state = em_init(I)
        for j in range(2):
            out = [t.clone() for t in step_tail_triton(x, eps, TABLE.coef[j], I, V, state, lamb=0.5, rho=0.001,
                                                       workspace=ws)]
        results.append((ws.n_tiles, out, state))
    (n_big, out_big, st_big), (n_small, out_small, st_small) = results
    assert n_big == 1 and n_small == 9
    for a, b in zip(out_big, out_small):
        _close(b, a, "small tiles")
    _compare_states(st_small, st_big, "small tiles")


@pytest.mark.parametrize("tau_reduce", ["batch", "image"])
def test_tau_finish_over_many_tiles(tau_reduce):
    """Kernel C's loop over more tiles than one block holds (B * n_tiles = 3000 > 1024)."""
    from types import SimpleNamespace

    B, n_tiles, H, W = 2, 1500, 30, 50
    partials = torch.rand(B, n_tiles, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    state = SimpleNamespace(tau_a=torch.zeros(B, 1, 1, 1, device=DEVICE), tau_b=torch.zeros(B, 1, 1, 1, device=DEVICE))
    em_tail._launch_tau_finish(state, SimpleNamespace(shape=(B, 1, H, W), n_tiles=n_tiles, partials=partials),
                               tau_reduce)
    if tau_reduce == "batch":
        expected = (partials.sum(dim=(0, 1)) / (B * H * W)).float().expand(B, 2)
    else:
        expected = (partials.sum(dim=1) / (H * W)).float()
    _close(torch.cat([state.tau_a.view(B, 1), state.tau_b.view(B, 1)], dim=1), expected, "tau", rtol=1e-7)


@pytest.mark.parametrize("tau_reduce", ["batch", "image"])
def test_batch_of_two_both_tau_modes(tau_reduce):
    I, V, x, eps = _sources(2, 24, 40, seed=1)  # noqa: E741
    for j, ref, ref_state, tri, tri_state in _tail_chain(I, V, x, eps, tau_reduce=tau_reduce):
        _close(tri[0], ref[0], f"{tau_reduce} step {j} x_prev", atol=ATOL_ORACLE["x_prev"])
        _compare_states(tri_state, ref_state, f"{tau_reduce} step {j}")
    tau = tri_state.tau_a.flatten()
    assert (tau[0] == tau[1]) == (tau_reduce == "batch"), "batch: one shared tau; image: one per image"


@pytest.mark.parametrize("kappa", [0.01, 0.1])
def test_soft_threshold_matches_oracle_and_differs_from_shrink(em_golden, kappa):
    """tv_prox='soft' (paper Eqs. 26-27) in both backends: zeroes some but not all gradients."""
    I, V = _t(em_golden, "case0/in/I"), _t(em_golden, "case0/in/V")  # noqa: E741
    ref_state, tri_state, shrink_state = em_init(I), em_init(I), em_init(I)
    for step in (1, 2, 3):
        f_pre = _t(em_golden, f"case0/in/f_pre_step{step}")
        F_ref, _ = em_step(f_pre, I, V, ref_state, tv_prox="soft", tv_threshold=kappa)
        F_tri, _ = em_step_triton(f_pre, I, V, tri_state, tv_prox="soft", tv_threshold=kappa)
        F_shrink, _ = em_step_triton(f_pre, I, V, shrink_state)
        _close(F_tri, F_ref, f"soft {kappa} step {step} F", atol=ATOL_ORACLE["F"])
        # soft keeps F1 ~ a1 instead of 0.001 * a1, so H (and with it F1) is ~1000x larger than with shrink
        # and rounds accordingly: compare F1/F2 with H's tolerance.
        for name in STATE:
            atol = ATOL_ORACLE["H"] if name in ("F1", "F2", "H") else None
            if atol is None:
                _close(getattr(tri_state, name), getattr(ref_state, name), f"soft {name}", rtol=RTOL_CD_ORACLE)
            else:
                _close(getattr(tri_state, name), getattr(ref_state, name), f"soft {name}", atol=atol)
        # Measured on case0: kappa 0.01 zeroes 12-26 % of F1/F2, kappa 0.1 zeroes 87-99.5 %.
        zeros = torch.cat([tri_state.F1.flatten() == 0, tri_state.F2.flatten() == 0]).float().mean().item()
        low, high = (0.05, 0.5) if kappa < 0.05 else (0.5, 0.9999)
        assert low < zeros < high, f"kappa {kappa}: {zeros:.2%} of F1, F2 are zero; expected some but not all"
        if step > 1:  # F1, F2 start at 0: the F update shows from the second step's H on
            assert (tri_state.H - shrink_state.H).abs().max() > 0.05, "soft must differ from shrink"
            # F sees H only through rho (Y - H) with rho = 0.001 (Eq. 29): measured differences 4e-6 .. 2e-5.
            assert (F_tri - F_shrink).abs().max() > 1e-6


def test_soft_threshold_in_the_fused_step():
    I, V, x, eps = _sources(1, 16, 24, seed=2)  # noqa: E741
    for j, ref, ref_state, tri, tri_state in _tail_chain(I, V, x, eps, steps=2, tv_prox="soft", tv_threshold=0.05):
        _close(tri[0], ref[0], f"soft step {j} x_prev", atol=ATOL_ORACLE["x_prev"])
        _close(tri_state.F1, ref_state.F1, f"soft step {j} F1", atol=ATOL_ORACLE["H"])


def test_non_contiguous_inputs_give_the_same_result():
    """Strided views (a transposed x_t, eps sliced out of the UNet's 6 channels, sliced sources) need no copy."""
    I, V, x, eps = _sources(2, 20, 28, seed=3)  # noqa: E741
    x_view = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major layout
    eps_view = torch.cat([eps, torch.zeros_like(eps)], dim=1)[:, :3]  # like model(x)[:, :3]
    I_view = torch.stack([I, torch.zeros_like(I)], dim=-1)[..., 0]  # element stride 2
    V_view = V.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not any(t.is_contiguous() for t in (x_view, eps_view, I_view, V_view))
    outs = []
    for args in ((x, eps, I, V), (x_view, eps_view, I_view, V_view)):
        state = em_init(I)
        outs.append([t.clone() for t in step_tail_triton(args[0], args[1], TABLE.coef[0], args[2], args[3], state,
                                                         lamb=0.5, rho=0.001)] + [state.H.clone(), state.C.clone()])
    for a, b in zip(*outs):
        _close(b, a, "strided vs contiguous")  # bitwise


def test_out_may_alias_x_t_and_state_is_updated_in_place():
    I, V, x, eps = _sources(1, 16, 24, seed=4)  # noqa: E741
    state = em_init(I)
    ptrs = {n: getattr(state, n).data_ptr() for n in (*STATE, "tau_a", "tau_b")}
    ref, _ = step_tail_triton(x, eps, TABLE.coef[0], I, V, em_init(I), lamb=0.5, rho=0.001)
    buf = x.clone()
    out, _ = step_tail_triton(buf, eps, TABLE.coef[0], I, V, state, lamb=0.5, rho=0.001, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    _close(buf, ref, "x_prev written over x_t")
    assert {n: getattr(state, n).data_ptr() for n in ptrs} == ptrs


# ------------------------------------------------------------------------------------- errors, dispatch


def test_tv_prox_options_are_checked():
    I = torch.zeros(1, 1, 4, 6, device=DEVICE)  # noqa: E741
    state = em_init(I)
    with pytest.raises(ValueError, match="needs an explicit tv_threshold"):
        em_step(I, I, I, state, tv_prox="soft")
    with pytest.raises(ValueError, match="needs an explicit tv_threshold"):
        em_step_triton(I, I, I, state, tv_prox="soft")
    with pytest.raises(ValueError, match="needs an explicit tv_threshold"):
        SamplerConfig(steps=2, tv_prox="soft")
    with pytest.raises(ValueError, match=">= 0"):
        em_step(I, I, I, state, tv_prox="soft", tv_threshold=-0.1)
    with pytest.raises(ValueError, match="only used with tv_prox='soft'"):
        em_step(I, I, I, state, tv_threshold=0.1)
    with pytest.raises(ConfigError, match="only used with tv_prox='soft'"):
        SamplerConfig(steps=2, tv_threshold=0.1)
    with pytest.raises(ValueError, match="tv_prox must be"):
        em_step_triton(I, I, I, state, tv_prox="hard", tv_threshold=0.1)
    with pytest.raises(ValueError, match="tau_reduce"):
        em_step_triton(I, I, I, state, tau_reduce="pixel")


def test_bad_workspace_and_inputs_are_errors():
    I = torch.zeros(1, 1, 4, 6, device=DEVICE)  # noqa: E741
    state = em_init(I)
    with pytest.raises(ValueError, match="workspace was made for"):
        em_step_triton(I, I, I, state, workspace=TailWorkspace.create(torch.zeros(1, 1, 4, 8, device=DEVICE)))
    with pytest.raises(ValueError, match="workspace was made for"):
        em_step_triton(I, I, I, state, workspace=TailWorkspace.create(I, rgb=True))
    with pytest.raises(TypeError, match="float32"):
        em_step_triton(I.double(), I, I, state)
    with pytest.raises(ValueError, match="at least 2 pixels"):
        em_step_triton(I[..., :1], I[..., :1], I[..., :1], state)
    with pytest.raises(ValueError, match="coef"):
        step_tail_triton(torch.zeros(1, 3, 4, 6, device=DEVICE), torch.zeros(1, 3, 4, 6, device=DEVICE), TABLE.coef,
                         I, I, state, lamb=0.5, rho=0.001)


def test_dispatch_picks_triton_when_asked(monkeypatch, em_golden):
    monkeypatch.delenv("DDFM_FAST_BACKEND", raising=False)
    assert triton_not_supported_reasons(DEVICE) == []
    assert plan(DEVICE, AccelConfig(backend="triton")).backend == "triton"
    if DEVICE.type == "cpu":
        auto = plan(DEVICE, AccelConfig(backend="auto"))
        assert auto.backend == "torch" and "interpreter" in auto.describe(), "auto never picks the interpreter"
    I, V = _t(em_golden, "case0/in/I"), _t(em_golden, "case0/in/V")  # noqa: E741
    f_pre = _t(em_golden, "case0/in/f_pre_step1")
    F_dispatch, _ = em_step(f_pre, I, V, em_init(I), backend="triton")
    F_direct, _ = em_step_triton(f_pre, I, V, em_init(I))
    _close(F_dispatch, F_direct, "em_step(backend='triton')")
