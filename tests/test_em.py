"""The plain-torch EM step against ``em_onestep.npz`` (the official ``EM_Initial`` + 3 chained ``EM_onestep``).

Tolerances. Our EM step runs the official operations in the official order, so everything that does not pass
through an FFT is bitwise equal. The FFTs are not: the goldens were made on a machine whose MKL FFT rounds
differently from this one (the OTFs alone already differ by 1.3e-7, one float32 ulp near 1). That ulp-level
difference in H (|H| <~ 2) propagates as follows, measured on this machine over all cases and steps:
    F  <= 3.0e-7 abs,  H <= 4.2e-7 abs,  F1/F2 <= 2.1e-9 abs (they are 0.001 * differences of H),
    C, D <= 1.1e-5 relative (C reaches 1e6 where I - f_pre ~ 0, so only a relative bound means anything),
    tau <= 1 ulp.
The bounds below are ~3x those numbers: tight enough to catch any wrong operation (a changed epsilon or a
missing clamp moves F by >1e-4), loose enough for another FFT library.
"""

from __future__ import annotations

import pytest
import torch

from ddfm_fast.em import em_init, em_step

CASES = [f"case{i}" for i in range(6)]
ATOL = {"F": 1e-6, "H": 1.5e-6, "F1": 1e-8, "F2": 1e-8}
RTOL_CD = 4e-5
RTOL_TAU = 4e-7


def _t(golden, key):
    return torch.from_numpy(golden[key])


def _run_chain(golden, case, tau_reduce="batch"):
    """Yields (step, F, state) for the three chained calls of a case, feeding f_pre as the goldens did."""
    I, V = _t(golden, f"{case}/in/I"), _t(golden, f"{case}/in/V")
    lamb, rho = float(golden[f"{case}/param/lamb"]), float(golden[f"{case}/param/rho"])
    state = em_init(I)
    f_pre = _t(golden, f"{case}/in/f_pre_step1")
    for step in (1, 2, 3):
        key = f"{case}/in/f_pre_step{step}"
        if key in golden:
            f_pre = _t(golden, key)
        F, state = em_step(f_pre, I, V, state, lamb=lamb, rho=rho, tau_reduce=tau_reduce)
        yield step, F, state
        f_pre = F  # case5 feeds F back (its later f_pre are not stored)


@pytest.mark.parametrize("case", CASES)
def test_em_initial(em_golden, case):
    state = em_init(_t(em_golden, f"{case}/in/I"))
    for name in ("k1", "k2", "k1sq", "k2sq"):
        ours = getattr(state, f"otf_{name}")
        ref = _t(em_golden, f"{case}/init/fft_{name}")
        assert ours.dtype == torch.complex64 and ours.shape == ref.shape
        # A few float32 ulp apart (|K| <= 2, |K|^2 <= 4); measured at most 6.5e-7 and 2.4e-6 (odd case1).
        torch.testing.assert_close(ours, ref, rtol=0, atol=5e-6 if name.endswith("sq") else 1.5e-6)
    for name in ("C", "D", "F1", "F2", "H"):
        torch.testing.assert_close(getattr(state, name), _t(em_golden, f"{case}/init/{name}"), rtol=0, atol=0)
    assert float(state.tau_a.flatten()[0]) == float(em_golden[f"{case}/init/tau_a"]) == 1.0


@pytest.mark.parametrize("case", CASES)
def test_em_chain_matches_official(em_golden, case):
    for step, F, state in _run_chain(em_golden, case):
        out = {"F": F, **{n: getattr(state, n) for n in ("C", "D", "F1", "F2", "H")}}
        for name, ours in out.items():
            key = f"{case}/out/{name}_step{step}"
            if key not in em_golden:
                continue  # case5 stores fewer state arrays (see em_onestep.npz)
            ref = _t(em_golden, key)
            if name in ("C", "D"):
                torch.testing.assert_close(ours, ref, rtol=RTOL_CD, atol=0, msg=lambda m: f"{key}: {m}")
            else:
                torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL[name], msg=lambda m: f"{key}: {m}")
        for name in ("tau_a", "tau_b"):
            ref = float(em_golden[f"{case}/out/{name}_step{step}"])
            ours = getattr(state, name)
            assert ours.shape == (F.shape[0], 1, 1, 1)
            assert torch.all(ours == ours.flatten()[0]), "batch mode holds one tau for the whole batch"
            assert float(ours.flatten()[0]) == pytest.approx(ref, rel=RTOL_TAU, abs=0), f"{case} {name} step{step}"


def test_case2_batch_mode_couples_images(em_golden):
    """Official behaviour: tau is one mean over both images, so image 0 alone gives a different result."""
    batched = [F for _, F, _ in _run_chain(em_golden, "case2", "batch")]
    alone = _single_image_chain(em_golden, 0)
    assert (batched[-1][0] - alone[-1][0]).abs().max() > 1e-4


def _single_image_chain(golden, i):
    I, V = _t(golden, "case2/in/I")[i:i + 1], _t(golden, "case2/in/V")[i:i + 1]
    state = em_init(I)
    out = []
    for step in (1, 2, 3):
        F, state = em_step(_t(golden, f"case2/in/f_pre_step{step}")[i:i + 1], I, V, state, 0.5, 0.001, "batch")
        out.append((F, state.tau_a.clone(), state.tau_b.clone(), state.C.clone()))
    return out


def test_case2_image_mode_equals_each_image_alone(em_golden):
    alone = [_single_image_chain(em_golden, i) for i in range(2)]
    for step, F, state in _run_chain(em_golden, "case2", "image"):
        for i in range(2):
            F1, tau_a, tau_b, C = alone[i][step - 1]
            # Same kernels on the same slices: bitwise equal on CPU.
            torch.testing.assert_close(F[i:i + 1], F1, rtol=0, atol=0)
            torch.testing.assert_close(state.C[i:i + 1], C, rtol=0, atol=0)
            assert state.tau_a[i].item() == tau_a.item() and state.tau_b[i].item() == tau_b.item()
        assert state.tau_a.flatten()[0] != state.tau_a.flatten()[1], "image mode keeps one tau per image"


def test_state_is_updated_in_place(em_golden):
    I, V = _t(em_golden, "case0/in/I"), _t(em_golden, "case0/in/V")
    state = em_init(I)
    ptrs = {n: getattr(state, n).data_ptr() for n in ("C", "D", "F1", "F2", "H", "tau_a", "tau_b")}
    _, returned = em_step(_t(em_golden, "case0/in/f_pre_step1"), I, V, state)
    assert returned is state
    assert {n: getattr(state, n).data_ptr() for n in ptrs} == ptrs
    assert state.H.abs().max() > 0


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (1, 1, 8, 1), (1, 1, 1, 1)])
def test_rejects_axes_shorter_than_two(shape):
    with pytest.raises(ValueError, match="at least 2 pixels"):
        em_init(torch.zeros(shape))


def test_rejects_mismatched_shapes_and_bad_mode():
    I = torch.zeros(1, 1, 4, 6)
    state = em_init(I)
    with pytest.raises(ValueError, match="shapes differ"):
        em_step(torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4, 5), state)
    with pytest.raises(ValueError, match="tau_reduce"):
        em_step(I, I, I, state, tau_reduce="pixel")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        em_init(torch.zeros(1, 3, 4, 4))


def test_two_by_two_is_accepted():
    I = torch.tensor([[[[0.1, -0.2], [0.3, 0.4]]]])
    V = torch.tensor([[[[0.0, 0.2], [-0.3, 0.1]]]])
    F, state = em_step((I + V) / 2, I, V, em_init(I))
    assert torch.isfinite(F).all() and F.shape == I.shape
