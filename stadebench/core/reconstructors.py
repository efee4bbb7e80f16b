"""Weight reconstruction for a fixed mask: new values for the kept weights of one linear
layer that lower its output error ‖(W − Ŵ)X‖² on the calibration inputs.

- ``obs_update``: SparseGPT's OBS column sweep (Frantar & Alistarh, 2023) with the mask
  given in advance: the error of every pruned weight is spread over the row's later
  columns through the upper Cholesky factor of the damped inverse Hessian. The sweep and
  the Hessian factor are the ones the ``sparsegpt`` metric runs (it passes a rule that
  picks the mask inside the sweep; here the rule reads the given mask).
- ``admm_update``: the ADMM weight update of Boža, 2024, "Fast and Effective Weight Update
  for Pruned Large Language Models" (fmfi-compbio/admm-pruning), its fixed-mask path.
- ``mean_bias``: STADE's bias correction, the shift of the mean output into the bias.

Pure tensor functions: weights are float32 ``[out, in]``, masks boolean ``[out, in]``
(True = pruned), Gram matrices ``XᵀX`` summed over the calibration tokens ``[in, in]``.
None of them modifies its arguments.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field

from ..base import LayerStats, Options, Reconstruction, Reconstructor
from ..errors import ConfigError, NumericalError
from ..hookspecs import hookimpl

#: ``pick(w, d, start)``: the mask (True = pruned) of the columns ``start ...`` whose current
#: weights ``w`` (``[rows, k]``) and Hessian-factor diagonal ``d`` (``[k]``) the sweep reached.
Pick = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def hessian_inverse_factor(gram: torch.Tensor, count: int, *, percdamp: float = 0.01, retries: int = 3,
                           what: str = "the Hessian") -> tuple[torch.Tensor, float, torch.Tensor]:
    """SparseGPT's ``(U, percdamp, dead)``: U the upper Cholesky factor of (H + λI)⁻¹, with
    H = (2/count)·gram and λ = percdamp·mean(diag H), the percdamp it took, and the dead
    inputs (diag H = 0, given H_jj = 1; their weights must be zeroed). When H + λI does not
    factor, percdamp is raised tenfold up to ``retries`` times, then NumericalError."""
    h = gram * (2.0 / count)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    scale = torch.mean(torch.diag(h))
    damp = percdamp
    for attempt in range(retries + 1):
        damped = h.clone()
        damped.diagonal().add_(damp * scale)
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            return torch.linalg.cholesky(hinv, upper=True), damp, dead
        except torch.linalg.LinAlgError:
            if attempt < retries:
                damp *= 10
    raise NumericalError(
        f"{what} is not positive definite even with percdamp={damp:g} ({retries} retries from {percdamp:g}); "
        "check the calibration data or raise percdamp")


def obs_sweep(w: torch.Tensor, hinv: torch.Tensor, pick: Pick, *, blocksize: int = 128, span: int = 0,
              order: Literal["fused", "released"] = "fused") -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column loop: ``(mask, updated weight)``; may overwrite ``w``.

    Columns go in blocks of ``blocksize``; ``pick`` is asked for the mask of the next
    ``span`` columns (0: the whole block) when the sweep reaches them, and each pruned
    weight's error is spread over the later columns of its row (within the block at once,
    beyond it once per block). ``order`` is the float order, the same algorithm either
    way: ``fused`` on Wᵀ with fused multiply-adds, ``released`` on W with each product
    rounded before it is subtracted, as the released SparseGPT code does.
    """
    if order == "released":
        return _sweep_released(w, hinv, pick, blocksize, span)
    if order != "fused":
        raise ConfigError(f"obs: order must be 'fused' or 'released', not {order!r}")
    # Work on Wᵀ so that a weight column is a contiguous row: ~2x faster on CPU.
    wt = w.t().contiguous()
    mask_t = torch.zeros_like(wt, dtype=torch.bool)
    cols = wt.shape[0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, m1 = wt[i1:i2].clone(), mask_t[i1:i2]
        h1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(h1).unsqueeze(1)
        err1 = torch.zeros_like(w1)
        step = span or i2 - i1
        for i in range(i2 - i1):
            if i % step == 0:
                g = slice(i, i + step)
                m1[g] = pick(w1[g].t(), d1[g, 0], i1 + i).t()
            err = w1[i].masked_fill(~m1[i], 0.0).div_(h1[i, i])  # (w - q) / d
            w1[i:].addr_(h1[i, i:], err, alpha=-1)
            w1[i].masked_fill_(m1[i], 0.0)
            err1[i] = err
        wt[i1:i2] = w1
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    return mask_t.t(), wt.t()


def _sweep_released(w: torch.Tensor, hinv: torch.Tensor, pick: Pick, blocksize: int,
                    span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``obs_sweep`` on W in the released code's float order."""
    mask = torch.zeros_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, m1 = w[:, i1:i2].clone(), mask[:, i1:i2]
        h1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(h1)
        kept, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        step = span or i2 - i1
        for i in range(i2 - i1):
            if i % step == 0:
                g = slice(i, i + step)
                m1[:, g] = pick(w1[:, g], d1[g], i1 + i)
            q = w1[:, i].masked_fill(m1[:, i], 0.0)
            kept[:, i] = q
            err = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1).matmul(h1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = kept
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return mask, w


def obs_update(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, count: int, *, blocksize: int = 128,
               percdamp: float = 0.01, damping_retries: int = 3, order: Literal["fused", "released"] = "fused",
               details: dict | None = None) -> torch.Tensor:
    """SparseGPT's OBS reconstruction for the given ``mask``: the new weight (float32; float64
    for a float64 weight).

    The ``sparsegpt`` metric's sweep and Hessian factor (``hessian_inverse_factor``, whose
    percdamp and retries these options are), with the mask read instead of chosen: given
    the mask that metric chose, the result is its weight bit for bit. Pruned entries are 0;
    so are the weights of dead inputs (an input that is 0 on every token). ``count`` is the
    number of tokens summed in ``gram`` (H = 2/count·gram; only rounding depends on it).
    When the damping had to be raised, ``details`` (if given) receives ``{"percdamp": λ}``.
    """
    if mask.shape != weight.shape:
        raise ConfigError(f"obs: mask of shape {tuple(mask.shape)} for a weight of shape {tuple(weight.shape)}")
    w = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32, copy=True)
    hinv, damp, dead = hessian_inverse_factor(gram.to(w.dtype), count, percdamp=percdamp, retries=damping_retries,
                                              what="obs: the Hessian")
    w[:, dead] = 0.0
    pruned = mask.bool()
    _, new = obs_sweep(w, hinv, lambda _w, _d, start: pruned[:, start:start + _w.shape[1]],
                       blocksize=blocksize, order=order)
    if details is not None and damp != percdamp:
        details["percdamp"] = damp
    return new.contiguous()


def admm_update(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, *, iterations: int = 20,
                rho: float = 1.0, percdamp: float = 0.1, eps: float = 1e-8, rho_growth: float = 1.0) -> torch.Tensor:
    """ADMM reconstruction for the given ``mask`` (Boža, 2024): the new float32 weight.

    Minimises ‖(W − Ŵ)X‖² + λ‖(W − Ŵ)D‖² over Ŵ with the mask's zeros, in the release's
    preconditioned variables: each input j scaled by dⱼ = ‖X_j‖ + ``eps``
    (sqrt(diag gram) + eps), so the scaled Gram has a unit diagonal, then damped by
    λ = ``percdamp``·mean of its diagonal (0.1 in the release's ``prune_admm``; G below is
    the damped one). Scaled ADMM with penalty ``rho``, from V = W and U = 0, ``iterations``
    times: Z = mask(V + U), U += V − Z, V = (G + ρI)⁻¹(G·W + ρ(Z − U)); the result is the
    last mask(V + U), not V.
    ``rho_growth`` multiplies ρ after every iteration (U rescaled to match); 1, the
    release's constant ρ, inverts G + ρI once, any other value eigendecomposes G once.
    The scaling makes the result independent of the Gram's scale but for ``eps``: pass the
    sum over tokens, as the release does. ``iterations=0`` returns the masked weight.
    """
    if mask.shape != weight.shape:
        raise ConfigError(f"admm: mask of shape {tuple(mask.shape)} for a weight of shape {tuple(weight.shape)}")
    if iterations < 0 or rho <= 0 or rho_growth <= 0:
        raise ConfigError("admm: iterations must be >= 0, rho and rho_growth > 0")
    scale, g = _admm_normalise(gram.float(), percdamp, eps)
    # [in, out], the paper's orientation: G·W is then a plain product.
    keep_t = ~mask.bool().t()
    v = (weight.float() * scale).t()
    target = g @ v
    solve = _admm_solver(g, rho, rho_growth)
    del g
    dual = torch.zeros_like(v)
    for step in range(iterations):
        z = torch.add(v, dual).mul_(keep_t)
        dual += v - z
        # G·W + ρ(Z − U) built in z's buffer: the same roundings, fewer [in, out] temporaries
        v = solve(z.sub_(dual).mul_(rho).add_(target), step)
        if rho_growth != 1.0:
            dual /= rho_growth
            rho *= rho_growth
    z = (v + dual).mul_(keep_t)
    return (z.t() / scale).masked_fill_(mask.bool(), 0.0)


def _admm_normalise(gram: torch.Tensor, percdamp: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, D⁻¹·gram·D⁻¹ + λI): the per-input scale d and the scaled, damped Gram."""
    scale = torch.diag(gram).sqrt() + eps
    g = (gram / scale).t() / scale
    g = g.t()
    g.diagonal().add_(percdamp * torch.diag(g).mean())
    return scale, g


def _admm_solver(g: torch.Tensor, rho: float, growth: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``solve(r, step)`` = (G + ρ_step·I)⁻¹ r, ρ_step = rho·growth^step; may overwrite ``g``."""
    if growth == 1.0:
        g.diagonal().add_(rho)
        inverse = torch.inverse(g)
        return lambda r, step: inverse @ r
    values, vectors = torch.linalg.eigh(g)
    return lambda r, step: vectors @ ((vectors.t() @ r) / (values + rho * growth ** step).unsqueeze(1))


def mean_bias(weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, *,
              updated: torch.Tensor | None = None) -> torch.Tensor:
    """STADE's bias correction, ``[out]``: (W − Ŵ)·μ, the mean output error over the
    calibration tokens (μ the inputs' mean), which added to the bias keeps the layer's mean
    output. Ŵ is ``updated`` (a reconstructed weight, pruned entries 0) or, by default, W
    masked, when this is Σ_j M_ij W_ij μ_j, what the ``stade`` metric adds."""
    if updated is None:
        return (weight * mask) @ mean
    return (weight - updated.masked_fill(mask, 0.0)) @ mean


class MeanBias(Reconstructor):
    """STADE's bias correction as a stage: the pruned weights' mean contribution moved into
    the bias, (W − Ŵ)·μ, the kept weights as they were."""

    name = "mean-bias"
    version = "1"
    statistics = frozenset({"sum"})

    def memory_bytes(self, rows: int, columns: int) -> int:
        """One ``[out, in]`` product."""
        return 4 * rows * columns

    def reconstruct(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> Reconstruction:
        """The dense weight (the host zeroes the pruned ones) and the bias delta that keeps the mean output."""
        return Reconstruction(None, mean_bias(weight, mask, stats.mean.to(weight.device)))


class OBS(Reconstructor):
    """SparseGPT's OBS weight update for a mask chosen by any metric (Frantar & Alistarh,
    2023): each pruned weight's error spread over the row's later columns through the
    damped inverse Hessian, column block by block."""

    name = "obs"
    version = "1"
    statistics = frozenset({"gram"})

    class Options(Options):
        blocksize: int = Field(128, ge=1, le=1 << 20, description="columns per block of the sweep")
        percdamp: float = Field(0.01, gt=0, le=10, description="damping: this share of the mean Hessian diagonal")
        order: Literal["fused", "released"] = Field(
            "fused", description="float order of the sweep: fused, or released (SparseGPT's, bit for bit)")

    def memory_bytes(self, rows: int, columns: int) -> int:
        """The Hessian, its factor and the sweep's copies: about 4·in² + 4·out·in floats."""
        return 4 * (4 * columns * columns + 4 * rows * columns)

    def reconstruct(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> Reconstruction:
        """The OBS-updated weight for ``mask`` (a raised damping is recorded in the details)."""
        details: dict = {}
        o = self.options
        new = obs_update(weight, mask, stats.gram, stats.count, blocksize=o.blocksize, percdamp=o.percdamp,
                         order=o.order, details=details)
        return Reconstruction(new, None, details)


class ADMM(Reconstructor):
    """The ADMM weight update of Boža (2024), "Fast and Effective Weight Update for Pruned
    Large Language Models", for a fixed mask; exact against fmfi-compbio/admm-pruning @ 8039208."""

    name = "admm"
    version = "1"
    statistics = frozenset({"gram"})

    class Options(Options):
        iterations: int = Field(20, ge=0, le=100_000, description="ADMM iterations (the release's iters)")
        rho: float = Field(1.0, gt=0, description="the penalty ρ (the release's, constant)")
        percdamp: float = Field(0.1, ge=0, le=10, description="damping of the scaled Gram (prune_admm's 0.1)")
        rho_growth: float = Field(1.0, gt=0, description="multiply ρ after every iteration (1: the release's "
                                                         "constant ρ; not in the release)")

    def memory_bytes(self, rows: int, columns: int) -> int:
        """The scaled Gram, its inverse and the iterates: about 4·in² + 8·out·in floats."""
        return 4 * (4 * columns * columns + 8 * rows * columns)

    def reconstruct(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStats) -> Reconstruction:
        """The ADMM-updated weight for ``mask``."""
        o = self.options
        return Reconstruction(admm_update(weight, mask, stats.gram, iterations=o.iterations, rho=o.rho,
                                          percdamp=o.percdamp, rho_growth=o.rho_growth))


@hookimpl
def register_reconstructors(register):
    register(MeanBias)
    register(OBS)
    register(ADMM)


__all__ = ["ADMM", "MeanBias", "OBS", "Pick", "admm_update", "hessian_inverse_factor", "mean_bias", "obs_sweep",
           "obs_update"]
