"""The whitened factorization: an update truncated for a layer's output error on real inputs.

This is the SVD-LLM idea applied to the update ``delta = W - W_init``: with ``X^T X = L L^T`` (the
layer's input Gram from calibration text, damped) the rank-r factors that minimize the layer's
output error ``||X (delta - B A)^T||_F`` on those inputs are the truncated SVD of ``delta L`` mapped
back through ``L^{-1}``. B and A are ordinary factors (any reader multiplies ``B @ A``); only their
choice changes. The Grams come from ``compression.calibration``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from inrank_convert.core.errors import NonFiniteError, UsageError
from inrank_convert.linalg.forms import Form, balance

DEFAULT_DAMPING = 1e-6  # relative to the mean of the Gram's diagonal
# Each failed Cholesky retries with the damping this many times larger, this many times, before
# the eigendecomposition square root.
DAMPING_GROWTH = 100.0
DAMPING_RETRIES = 2
# A Cholesky factor whose smallest squared pivot is below this fraction of its largest is
# numerically singular (solves through it would lose every digit): it counts as a failure.
PIVOT_FLOOR = 1e-12
WHITENED_ENGINE = "whitened"  # the manifest's svd field of an entry factorized for its input Gram


@dataclass
class Whitening:
    """A square root ``L`` of the damped Gram (``L L^T = gram + damping * mean(diag) * I``).

    ``method`` is ``"cholesky"`` (first try), ``"cholesky-damped"`` (after raising the damping)
    or ``"eigh"`` (eigendecomposition, eigenvalues floored at the last damping): then
    ``L = Q diag(root)`` and ``factor`` holds Q.
    """

    factor: torch.Tensor  # [in, in] float64: lower-triangular L, or Q for eigh
    root: torch.Tensor | None  # sqrt of the floored eigenvalues (eigh only)
    method: str
    damping: float  # relative damping used
    notes: list[str] = field(default_factory=list)

    def right_multiply(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix @ L``."""
        if self.root is None:
            return matrix @ self.factor
        return (matrix @ self.factor) * self.root

    def right_solve(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix @ L^{-1}``, by a triangular solve (never an explicit inverse)."""
        if self.root is None:
            # X L = M  <=>  L^T X^T = M^T
            return torch.linalg.solve_triangular(self.factor.T, matrix.T, upper=True).T
        return (matrix / self.root) @ self.factor.T


def _where(name: str | None) -> str:
    return name or "the layer"


def whiten(gram: torch.Tensor, *, damping: float = DEFAULT_DAMPING, name: str | None = None) -> Whitening:
    """The square root of ``gram`` (float64): Cholesky with damping, more damping if it fails, then eigh."""
    if not damping >= 0 or not math.isfinite(damping):
        raise UsageError(f"the calibration damping must be a finite number >= 0, got {damping}", None, "e.g. 1e-6")
    G = gram.to(torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise NonFiniteError("the calibration Gram holds NaN or Inf", _where(name),
                             "check the model's activations on the calibration text (run it in float32)")
    G = (G + G.T) / 2
    scale = float(G.diagonal().mean()) if G.numel() else 1.0
    if not scale > 0:
        scale = 1.0  # no signal at all: damping alone (the plain SVD's problem)
    identity = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    base = damping if damping > 0 else 1e-8
    schedule = [damping] + [base * DAMPING_GROWTH**k for k in range(1, DAMPING_RETRIES + 1)]
    notes = []
    for attempt, relative in enumerate(schedule):
        L, info = torch.linalg.cholesky_ex(G + relative * scale * identity)
        pivots = L.diagonal().square()
        if int(info) == 0 and bool(torch.isfinite(L).all()) and float(pivots.min()) > PIVOT_FLOOR * float(pivots.max()):
            return Whitening(L, None, "cholesky" if attempt == 0 else "cholesky-damped", relative, notes)
        notes.append(f"Cholesky failed with damping {relative:g}")
    try:
        w, Q = torch.linalg.eigh(G)
    except RuntimeError as err:  # torch.linalg.LinAlgError on non-convergence
        raise UsageError(f"the calibration Gram cannot be factorized even with damping {schedule[-1]:g} and an "
                         f"eigendecomposition ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                         _where(name), "calibrate on more or other text, or compress without calibration") from err
    floor = schedule[-1] * scale
    notes.append(f"eigendecomposition square root, eigenvalues floored at {schedule[-1]:g} x mean(diag)")
    return Whitening(Q, w.clamp(min=floor).sqrt(), "eigh", schedule[-1], notes)


@dataclass
class WhitenedSVD:
    """The SVD of the whitened update ``delta_[out, in] @ L``, computed once: ``factors(r)`` truncates it."""

    U: torch.Tensor  # [out, k] float64
    S: torch.Tensor  # [k] float64, descending: the whitened singular values (the full spectrum)
    Vh: torch.Tensor  # [k, in] float64
    whitening: Whitening
    conv1d: bool

    @property
    def total_energy(self) -> float:
        """||delta L||_F^2: the output error energy of the zero approximation (damped)."""
        return float(self.S.square().sum())

    def info(self) -> dict:
        return {"singular_values": self.S, "damping": self.whitening.damping, "method": self.whitening.method,
                "notes": list(self.whitening.notes), "total_energy": self.total_energy}

    def factors(self, rank: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with ``B @ A`` the rank-``rank`` optimum, in the update's stored orientation."""
        if not 0 <= rank <= self.S.numel():
            raise ValueError(f"rank {rank} outside [0, {self.S.numel()}]")
        root = self.S[:rank].sqrt()
        B = self.U[:, :rank] * root  # [out, r]
        A = self.whitening.right_solve(root[:, None] * self.Vh[:rank])  # [r, in]
        if self.conv1d:  # stored [in, out]: delta_stored ~ A^T B^T
            B, A = A.T, B.T
        dtype = dtype or torch.float64
        return B.to(dtype).contiguous(), A.to(dtype).contiguous()


    def form(self, rank: int) -> Form:
        """What compress stores at ``rank``: low rank (float32 factors, balanced), or zero at rank 0.
        Its energy is the fraction of the *output* error energy removed (s_i^2 of the whitened
        spectrum), the quantity the components were chosen by."""
        notes = [*self.whitening.notes]
        whole = self.total_energy
        energy = float(self.S[:rank].square().sum()) / whole if whole > 0 else 1.0
        if rank == 0:
            return Form("zero", energy=energy if whole > 0 else 1.0, engine=WHITENED_ENGINE, notes=notes)
        B, A = balance(*self.factors(rank, torch.float32))
        return Form("lowrank", B, A, rank=rank, energy=min(1.0, energy), engine=WHITENED_ENGINE,
                    notes=[*notes, f"rank {rank} of the update whitened by its input Gram ({self.whitening.method})"])


def whitened_svd(delta: torch.Tensor, gram: torch.Tensor, *, damping: float = DEFAULT_DAMPING, conv1d: bool = False,
                 name: str | None = None) -> WhitenedSVD:
    """The whitened SVD of an update stored [out, in] (nn.Linear) or [in, out] (``conv1d``)."""
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    D = (delta.T if conv1d else delta).to(device=gram.device, dtype=torch.float64)  # [out, in]
    if gram.shape != (D.shape[1], D.shape[1]):
        raise ValueError(f"gram {tuple(gram.shape)} does not match the layer's input width {D.shape[1]}")
    if not bool(torch.isfinite(D).all()):
        raise NonFiniteError("the update holds NaN or Inf", _where(name), "check the checkpoint for NaN weights")
    whitening = whiten(gram, damping=damping, name=name)
    U, S, Vh = torch.linalg.svd(whitening.right_multiply(D), full_matrices=False)
    return WhitenedSVD(U, S, Vh, whitening, conv1d)


def whitened_singular_values(delta: torch.Tensor, gram: torch.Tensor, *, damping: float = DEFAULT_DAMPING,
                             conv1d: bool = False, name: str | None = None) -> tuple[torch.Tensor, dict]:
    """The whitened spectrum alone (float64, descending; s_i^2 is the output error energy that
    component i removes) and the info of ``whitened_factorize``."""
    svd = whitened_svd(delta, gram, damping=damping, conv1d=conv1d, name=name)
    return svd.S, svd.info()


def whitened_factorize(delta: torch.Tensor, gram: torch.Tensor, rank: int, *, damping: float = DEFAULT_DAMPING,
                       conv1d: bool = False, name: str | None = None, dtype: torch.dtype | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rank-``rank`` factors ``B @ A ~= delta`` (stored orientation) that minimize the layer's output
    error ``||X (delta - B A)^T||_F`` on the calibration inputs (``gram = X^T X``, damped).

    ``dtype`` is the factors' dtype (default: ``delta``'s). ``info``: ``singular_values`` (the
    whitened spectrum, all of it), ``damping`` (relative, as used), ``method`` (``cholesky``,
    ``cholesky-damped`` or ``eigh``), ``notes``, ``total_energy``.
    """
    svd = whitened_svd(delta, gram, damping=damping, conv1d=conv1d, name=name)
    B, A = svd.factors(rank, dtype or delta.dtype)
    return B, A, svd.info()
