"""The EM rectification step of DDFM (Zhao et al., ICCV 2023, Sec. 3.3, Eqs. 16-30), in plain PyTorch.

This is the oracle and the CPU path: it follows the official ``EM_onestep`` operation for operation, so on the
same device and thread count it reproduces the official floats bit for bit. Accelerated backends must match it.

The model (Sec. 3.2) writes the fusion as a regression of ``Y = I - V`` on ``X = I - F`` with a Laplacian
(l1) data term, a total-variation prior on ``Y - X``, and the hierarchical Bayesian view of Eq. 12-15.

Notation (variable -> paper):
    I, V      the two sources, in [-1, 1]: I is the image the official driver reads from ``vi/`` (paper: i),
              V the one from ``ir/`` (paper: v); the roles are fixed by the driver, see ``DESIGN.md``
    f_pre     f_{0|t}: the luminance of the diffusion model's x0 prediction, in the official Y/255 scale
    Y, X      Y = I - V, X = f_pre - V                                                  (Eq. 11)
    C, D      E-step expectations of the latent scale variables, 1/m and 1/n            (Eq. 16)
    tau_a/b   the hyper-parameters, updated as means over the image(s)                 (Eq. 17)
    H         the TV proximal solution, solved in the Fourier domain                    (Eq. 25)
    F1, F2    the auxiliary gradient variables of the TV term (horizontal, vertical)   (Eqs. 26-27)
    lamb, rho the TV weight lambda and the ADMM penalty rho
    F         the rectified luminance, F = I - X                                        (Eq. 29-30)

Where the official code differs from the paper (reproduced here, on purpose):
    * the F sub-problem uses a linear shrink ``rho / (2*lamb + rho) * a`` (the solution of a squared-l2
      penalty), not the soft threshold of Eq. 26-27; both backends offer the soft threshold as an option
      (``tv_prox="soft"`` with an explicit ``tv_threshold``, see :func:`resolve_tv_prox`);
    * ``f_pre`` is in the Y/255 scale of the [-1, 1] RGB x0 (about [-0.80, 0.92]) while I and V are in [-1, 1];
    * differences of H are not circular: the last column (row) keeps H itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TauReduce = Literal["batch", "image"]
TVProx = Literal["shrink", "soft"]

# The official epsilons (EM_onestep): inside the square for C, added after squaring for D, and 1e-10 in the
# tau means. They are kept exactly; changing any of them changes the official floats.
EPS_D = 1e-6
EPS_C = 1e-6
EPS_TAU = 1e-10


@dataclass
class EMState:
    """The EM state carried through all sampling steps of one batch, allocated once per image size.

    ``C, D, F1, F2, H`` have the images' shape (B, 1, H, W). ``tau_a, tau_b`` have shape (B, 1, 1, 1): with
    ``tau_reduce="batch"`` every entry holds the same batch mean (the official 0-d value, broadcast), with
    ``"image"`` one value per image. The OTFs of the difference operators and the TV denominator
    ``1 + |K1|^2 + |K2|^2`` are (H, W) complex64 constants. :func:`em_step` updates all tensors in place, so
    their addresses never change (a CUDA graph can capture the step).
    """

    C: torch.Tensor
    D: torch.Tensor
    F1: torch.Tensor
    F2: torch.Tensor
    H: torch.Tensor
    tau_a: torch.Tensor
    tau_b: torch.Tensor
    otf_k1: torch.Tensor
    otf_k2: torch.Tensor
    otf_k1sq: torch.Tensor
    otf_k2sq: torch.Tensor
    tv_denom: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.C.shape

    def reset(self) -> None:
        """Back to the official initial state (C = D = 1, F1 = F2 = H = 0, tau = 1), in place."""
        for t in (self.C, self.D, self.tau_a, self.tau_b):
            t.fill_(1.0)
        for t in (self.F1, self.F2, self.H):
            t.zero_()


def _check_image(t: torch.Tensor, name: str) -> None:
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{name}: expected a (B, 1, H, W) tensor, got shape {tuple(t.shape)}")
    if t.shape[-2] < 2 or t.shape[-1] < 2:
        # psf2otf takes its 'make real' branch on a 1-pixel axis and the difference operators change meaning.
        raise ValueError(
            f"{name}: the EM step needs at least 2 pixels on each axis, got {t.shape[-2]}x{t.shape[-1]} (H x W)"
        )
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: the EM step runs in float32, got {t.dtype}")


def difference_otfs(height: int, width: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """OTFs of the forward differences (psf2otf of ``[1, -1]`` and ``[[1], [-1]]``), complex64 (H, W).

    psf2otf zero-pads the kernel at the top-left and shifts it circularly by -1 along its length-2 axis, which
    leaves -1 at (0, 0) and +1 at (0, W-1) (resp. (H-1, 0)). Valid for H, W >= 2.
    """
    k1 = torch.zeros(height, width, dtype=torch.float32, device=device)
    k1[0, 0], k1[0, width - 1] = -1.0, 1.0
    k2 = torch.zeros(height, width, dtype=torch.float32, device=device)
    k2[0, 0], k2[height - 1, 0] = -1.0, 1.0
    return torch.fft.fftn(k1.to(torch.complex64)), torch.fft.fftn(k2.to(torch.complex64))


def em_init(I: torch.Tensor) -> EMState:  # noqa: E741 (the paper's name)
    """``EM_Initial``: the OTFs and the initial state for images shaped like ``I`` (B, 1, H, W)."""
    _check_image(I, "I")
    B, _, H, W = I.shape
    k1, k2 = difference_otfs(H, W, I.device)
    k1sq, k2sq = torch.conj(k1) * k1, torch.conj(k2) * k2
    ones = lambda: torch.ones_like(I)  # noqa: E731
    zeros = lambda: torch.zeros_like(I)  # noqa: E731
    tau = lambda: torch.ones(B, 1, 1, 1, dtype=torch.float32, device=I.device)  # noqa: E731
    return EMState(
        C=ones(), D=ones(), F1=zeros(), F2=zeros(), H=zeros(), tau_a=tau(), tau_b=tau(),
        otf_k1=k1, otf_k2=k2, otf_k1sq=k1sq, otf_k2sq=k2sq,
        # (1 + K1sq) + K2sq, in the official order, computed once instead of at every step.
        tv_denom=1 + k1sq + k2sq,
    )


def _tau_mean(t: torch.Tensor, tau_reduce: TauReduce) -> torch.Tensor:
    """Eq. 17's mean, over the whole batch (official) or per image; shaped (B,1,1,1) either way."""
    if tau_reduce == "batch":
        return torch.mean(t).expand(t.shape[0], 1, 1, 1)
    if tau_reduce == "image":
        # One full reduction per image: the same kernel as a batch of one, so a batched image gets the very
        # floats it would get alone.
        return torch.stack([torch.mean(t[i]) for i in range(t.shape[0])]).view(-1, 1, 1, 1)
    raise ValueError(f"tau_reduce must be 'batch' or 'image', got {tau_reduce!r}")


def prox_tv(residual: torch.Tensor, state: EMState) -> torch.Tensor:
    """Eq. 25: ``H = ifft2((fft2(Y - X) + conj(K1) fft2(F1) + conj(K2) fft2(F2)) / (1 + |K1|^2 + |K2|^2))``."""
    num = (
        torch.fft.fft2(residual)
        + torch.conj(state.otf_k1) * torch.fft.fft2(state.F1)
        + torch.conj(state.otf_k2) * torch.fft.fft2(state.F2)
    )
    return torch.real(torch.fft.ifft2(num / state.tv_denom))


def forward_diff_keep_last(h: torch.Tensor, dim: int) -> torch.Tensor:
    """``a[j] = h[j] - h[j+1]`` for j < n-1 and ``a[n-1] = h[n-1]`` along ``dim`` (not circular, as official)."""
    n = h.shape[dim]
    head = h.narrow(dim, 0, n - 1) - h.narrow(dim, 1, n - 1)
    return torch.cat([head, h.narrow(dim, n - 1, 1)], dim=dim)


def resolve_tv_prox(tv_prox: str, tv_threshold: float | None) -> float | None:
    """Check the F sub-problem's options (Eqs. 26-27); returns the soft threshold kappa, or None for "shrink".

    ``"shrink"`` (official) is ``F = rho / (2 lamb + rho) * a`` and takes no threshold. ``"soft"`` (the paper's
    equations) is ``F = sign(a) * max(|a| - kappa, 0)`` and needs an explicit ``tv_threshold`` kappa >= 0. There is
    no default: the paper's kappa = lamb / rho is 500 with the official lamb = 0.5, rho = 0.001, while the
    differences |a| of H stay below 1 (over the official EM goldens: at most 0.72, which is the last row or
    column keeping H itself; interior differences at most 0.35, medians 0.008-0.035), so it would zero every
    gradient and silently switch the TV term off. Useful thresholds are of the order of the gradients, e.g.
    0.01-0.1.
    """
    if tv_prox == "shrink":
        if tv_threshold is not None:
            raise ValueError("tv_threshold is only used with tv_prox='soft'; the official 'shrink' takes none")
        return None
    if tv_prox == "soft":
        if tv_threshold is None:
            raise ValueError(
                "tv_prox='soft' needs an explicit tv_threshold kappa >= 0 (e.g. 0.01-0.1). The paper's lamb/rho "
                "(= 500 with the official lamb=0.5, rho=0.001) is far above the gradients of H (|a| < 1) and would "
                "zero every one, silently switching the TV term off")
        kappa = float(tv_threshold)
        if not kappa >= 0 or kappa == float("inf"):
            raise ValueError(f"tv_threshold must be a finite number >= 0, got {tv_threshold!r}")
        return kappa
    raise ValueError(f"tv_prox must be 'shrink' (official) or 'soft' (paper Eqs. 26-27), got {tv_prox!r}")


def em_step(
    f_pre: torch.Tensor,
    I: torch.Tensor,  # noqa: E741
    V: torch.Tensor,
    state: EMState,
    lamb: float = 0.5,
    rho: float = 0.001,
    tau_reduce: TauReduce = "batch",
    tv_prox: TVProx = "shrink",
    tv_threshold: float | None = None,
    *,
    backend: str = "torch",
) -> tuple[torch.Tensor, EMState]:
    """One EM step (``EM_onestep``): E-step (Eqs. 16-17), TV prox (Eq. 25), shrink (26-27), LS (29), F = I - X.

    Args:
        f_pre: the luminance estimate f_{0|t}, (B, 1, H, W) float32.
        I, V: the sources (B, 1, H, W) float32 in [-1, 1], in the official driver's roles.
        state: from :func:`em_init`; updated in place and returned.
        lamb, rho: Python floats (the official driver uses 0.5 and 0.001).
        tau_reduce: ``"batch"`` (official: tau is a mean over the whole batch, so batched images influence each
            other) or ``"image"`` (one tau per image, so a batch gives each image the result it gets alone).
        tv_prox: the F sub-problem: ``"shrink"`` (official linear shrink, the default) or ``"soft"`` (the
            paper's soft threshold with ``tv_threshold``; see :func:`resolve_tv_prox`).
        tv_threshold: the soft threshold kappa >= 0; required with ``"soft"``, not allowed with ``"shrink"``.
        backend: ``"torch"`` (this plain-torch oracle, always; the environment override does not apply) or
            ``"triton"`` / ``"auto"`` resolved by :func:`ddfm_fast.plan.plan` to the fused kernels
            of ``ddfm_fast.kernels.em_tail`` (which allocate their buffers per call here).

    Returns:
        ``(F, state)`` with F = I - X the rectified luminance (B, 1, H, W).
    """
    kappa = resolve_tv_prox(tv_prox, tv_threshold)
    if backend != "torch":
        from ddfm_fast.config import AccelConfig
        from ddfm_fast.plan import plan

        if plan(f_pre.device, AccelConfig(backend=backend)).backend == "triton":
            from ddfm_fast.kernels.em_tail import em_step_triton

            return em_step_triton(f_pre, I, V, state, lamb, rho, tau_reduce, tv_prox=tv_prox,
                                  tv_threshold=tv_threshold)
    for name, t in (("f_pre", f_pre), ("I", I), ("V", V)):
        _check_image(t, name)
    if not (f_pre.shape == I.shape == V.shape == state.shape):
        raise ValueError(
            f"em_step: shapes differ: f_pre {tuple(f_pre.shape)}, I {tuple(I.shape)}, V {tuple(V.shape)}, "
            f"state {tuple(state.shape)}"
        )
    Y = I - V
    X = f_pre - V

    # E-step (Eq. 16) with the previous tau. The clamp D <= 2C keeps the LS weights bounded where X ~ 0.
    D = torch.sqrt(2 / state.tau_b / (X**2 + EPS_D))
    C = torch.sqrt(2 / state.tau_a / ((Y - X + EPS_C) ** 2))
    D = torch.where(D > 2 * C, 2 * C, D)
    # Hyper-parameters (Eq. 17).
    tau_b = _tau_mean(1.0 / (D + EPS_TAU) + state.tau_b / 2, tau_reduce)
    tau_a = _tau_mean(1.0 / (C + EPS_TAU) + state.tau_a / 2, tau_reduce)

    # M-step: TV prox (Eq. 25), then the F sub-problem. The official code shrinks linearly (see module doc);
    # the factor is computed in double precision from Python floats, then applied to the float32 tensor.
    H = prox_tv(Y - X, state)
    if kappa is None:
        shrink = rho / (2 * lamb + rho)
        F1 = shrink * forward_diff_keep_last(H, -1)
        F2 = shrink * forward_diff_keep_last(H, -2)
    else:
        # The paper's Eqs. 26-27: soft threshold sign(a) * max(|a| - kappa, 0).
        a1, a2 = forward_diff_keep_last(H, -1), forward_diff_keep_last(H, -2)
        F1 = torch.sign(a1) * torch.clamp(a1.abs() - kappa, min=0)
        F2 = torch.sign(a2) * torch.clamp(a2.abs() - kappa, min=0)
    # Least squares for X (Eq. 29).
    X = (2 * C * Y + rho * (Y - H)) / (2 * C + 2 * D + rho)
    F = I - X

    for dst, src in ((state.C, C), (state.D, D), (state.F1, F1), (state.F2, F2), (state.H, H),
                     (state.tau_a, tau_a), (state.tau_b, tau_b)):
        dst.copy_(src)
    return F, state
