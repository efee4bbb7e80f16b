"""The engine's masks and weights against deliberately naive reference implementations.

Everything on the reference side is written here from the formulas of docs/design.md ("Metric semantics"), as
plainly as possible, without any stadebench helper:

- inputs: plain forward hooks on the ``nn.Linear`` modules of the model, storing every
  input row, during a forward pass of the *whole model*. The sequential protocol falls
  out of pruning the model in place block by block: when block k is captured, blocks
  < k are already pruned and block k is still dense, so all of its layers see one dense
  pass of the block given the pruned earlier blocks. One-shot captures every block from
  the dense model before anything is pruned.
- scores: float64 formulas on the stored inputs (two-pass variance, explicit Σx²).
- patterns: a stable argsort of each decision group (row / whole matrix / M columns).
- SparseGPT: the OBS procedure with an immediate (non-lazy) update of every later column,
  which is algebraically the same as the released code's lazy block update.

The engine's masks are read from its pattern (a spy on ``select``), not from the weights:
SmolLM2's de-quantised weights contain exact zeros.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import stadebench
from stadebench.base import STATISTICS, LayerInfo, LayerStats
from stadebench.core.metrics.sparsegpt import SparseGPT
from stadebench.plugins import get_plugins

INTERNAL = ("o_proj", "down_proj")  # naive role rule for Llama-family models, by name

pytestmark = pytest.mark.usefixtures("single_thread")

# ----------------------------------------------------------------------------------------
# Naive reference protocol


class _Stop(Exception):
    pass


def llama_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, mod) for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]


def capture_inputs(model, calibration, blocks: list[int]) -> dict[tuple[int, str], torch.Tensor]:
    """Every input row of every linear of ``blocks`` (float64 [T, in]), from whole-model forwards."""
    store: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for k in blocks:
        for name, mod in llama_linears(model.model.layers[k]):
            def hook(module, args, output, key=(k, name)):
                x = args[0].detach()
                store.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).double())
            handles.append(mod.register_forward_hook(hook))

    def stop(module, args, output):
        raise _Stop

    handles.append(model.model.layers[max(blocks)].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for batch in calibration.split(8):
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(chunks) for key, chunks in store.items()}


def naive_scores(metric: str, name: str, weight: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().double()
    if metric == "magnitude":
        return w.abs()
    wanda = w.abs() * x.pow(2).sum(0).sqrt()
    stade = w.pow(2) * x.var(0, unbiased=True)
    if metric == "wanda":
        return wanda
    if metric == "stade":
        return stade
    if metric == "stade-w":
        return stade if name.endswith(INTERNAL) else wanda
    raise AssertionError(metric)


def decision_groups(a: np.ndarray, pattern: str) -> np.ndarray:
    """Rows of the returned 2-D view are the groups a pattern decides independently."""
    if pattern == "unstructured":
        return a.reshape(a.shape[0], -1)
    if pattern == "unstructured-layer":
        return a.reshape(1, -1)
    m = int(pattern.split(":")[1])
    return a.reshape(-1, m)


def prune_count(pattern: str, groups: np.ndarray, sparsity: float) -> int:
    if ":" in pattern:
        return int(pattern.split(":")[0])
    return int(groups.shape[1] * sparsity)


def naive_mask(scores: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    s = scores.numpy()
    groups = decision_groups(s, pattern)
    k = prune_count(pattern, groups, sparsity)
    mask = np.zeros(groups.shape, dtype=bool)
    order = np.argsort(groups, axis=1, kind="stable")[:, :k]
    np.put_along_axis(mask, order, True, axis=1)
    return torch.from_numpy(mask.reshape(s.shape))


def naive_prune(model, calibration, metric: str, pattern: str, sparsity: float, sequential: bool,
                bias_correction: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Prune ``model`` in place by the reference protocol; {layer name: (scores, mask)}."""
    n_blocks = len(model.model.layers)
    data_free = metric == "magnitude"
    inputs = {} if data_free or sequential else capture_inputs(model, calibration, list(range(n_blocks)))
    out = {}
    for k in range(n_blocks):
        block = model.model.layers[k]
        if sequential and not data_free:
            inputs = capture_inputs(model, calibration, [k])  # blocks < k already pruned
        for name, layer in llama_linears(block):
            x = inputs.get((k, name))
            scores = naive_scores(metric, name, layer.weight, x)
            mask = naive_mask(scores, pattern, sparsity)
            with torch.no_grad():
                dense = layer.weight.detach().double().clone()
                layer.weight[mask] = 0.0
                if bias_correction and (metric == "stade" or (metric == "stade-w" and name.endswith(INTERNAL))):
                    delta = (dense * mask) @ x.mean(0)
                    if layer.bias is None:
                        layer.bias = nn.Parameter(torch.zeros(layer.out_features), requires_grad=False)
                    layer.bias += delta.float()
            out[f"model.layers.{k}.{name}"] = (scores, mask)
    return out


def spy_pattern(spec: str):
    """The registered pattern for ``spec``, recording every mask it returns."""
    pattern = get_plugins().patterns.get(spec).cls.from_spec(spec)
    pattern.recorded = []
    select = pattern.select

    def recording_select(scores, sparsity):
        mask = select(scores, sparsity)
        pattern.recorded.append(mask.clone())
        return mask

    pattern.select = recording_select
    return pattern


def engine_prune(model, calibration, metric, pattern: str, sparsity, sequential, **options):
    spy = spy_pattern(pattern)
    report = stadebench.prune(model, calibration, metric=metric, pattern=spy, sparsity=sparsity,
                              sequential=sequential, metric_options=options or None)
    assert len(spy.recorded) == len(report.layers)
    return report, {layer.name: mask for layer, mask in zip(report.layers, spy.recorded)}


def assert_masks_match(engine: torch.Tensor, scores: torch.Tensor, reference: torch.Tensor, pattern: str,
                       sparsity: float, rtol: float, max_ambiguous: float = 0.005) -> float:
    """Engine mask vs reference mask, away from the threshold.

    Why a band and not equality: the engine accumulates statistics in float32 (and
    sums in another order), so its (non-negative) scores e differ from the float64
    reference scores x by a relative δ: e ∈ x·[1-δ, 1+δ]. In a group where the
    reference prunes the k lowest, let t_k and t_k+1 be its k-th and (k+1)-th smallest
    scores. An entry with x < t_k+1·(1-δ)/(1+δ) has an engine score below the engine's
    (k+1)-th smallest, so the engine prunes it too; an entry with x > t_k·(1+δ)/(1-δ)
    is above the engine's k-th smallest, so the engine keeps it. Only entries in
    [t_k+1·(1-rtol), t_k·(1+rtol)] (rtol > 2δ/(1-δ)) can legitimately differ: near-ties,
    a band that is empty unless t_k and t_k+1 are within ~2·rtol of each other.
    Everywhere else the masks must be equal; the exact count per group is checked for
    every group, and the band must stay small so that the comparison is not vacuous.
    Returns the fraction of weights in the band.
    """
    assert engine.shape == reference.shape == scores.shape
    groups_e = decision_groups(engine.numpy(), pattern)
    s = decision_groups(scores.numpy(), pattern)
    assert (s >= 0).all()
    k = prune_count(pattern, s, sparsity)
    assert (groups_e.sum(1) == k).all(), "engine does not prune exactly k per decision group"
    if k == 0:
        assert not engine.any()
        return 0.0
    ordered = np.sort(s, axis=1)
    t_k = ordered[:, k - 1:k]
    t_k1 = ordered[:, k:k + 1] if k < s.shape[1] else np.full_like(t_k, np.inf)
    ambiguous = (s >= t_k1 * (1 - rtol)) & (s <= t_k * (1 + rtol))
    differ = groups_e != decision_groups(reference.numpy(), pattern)
    bad = differ & ~ambiguous
    assert not bad.any(), f"{int(bad.sum())} weights decided differently away from the threshold"
    fraction = float(ambiguous.mean())
    assert fraction <= max_ambiguous, f"{fraction:.2%} of the weights are near-ties: comparison too weak"
    return fraction


# Tolerance of the band (see assert_masks_match). The engine's scores use Σx² from a
# float32 norm (relative error ~2e-6 measured on SmolLM2 with 512 tokens); STADE's
# one-pass variance (Σx² - (Σx)²/n) amplifies it by 1 + μ²/σ², up to ~2.6e-4 for the
# attention output of SmolLM2's block 0 (|μ|/σ ≈ 23). rtol = 1e-3 > 2·δ with margin.
# Magnitude is compared for exact equality: both sides sort the same float32 |W|.
RTOL = 1e-3
CASES = [  # (metric, pattern, sequential) on SmolLM2: every pattern under both protocols
    ("wanda", "unstructured", True),
    ("wanda", "2:4", False),
    ("stade", "2:4", True),
    ("stade", "unstructured-layer", False),
    ("stade-w", "unstructured-layer", True),
    ("stade-w", "unstructured", False),
    ("stade-w", "2:4", True),
]
TINY_CASES = [(m, p, s) for m in ("wanda", "stade", "stade-w")
              for p in ("unstructured", "unstructured-layer", "2:4") for s in (True, False)]


def check_against_reference(model, calibration, metric, pattern, sequential, sparsity=0.5):
    reference_model = copy.deepcopy(model)
    dense = {name: layer.weight.detach().clone() for name, layer in llama_linears(model)}
    report, engine_masks = engine_prune(model, calibration, metric, pattern, None if ":" in pattern else sparsity,
                                        sequential)
    reference = naive_prune(reference_model, calibration, metric, pattern, sparsity, sequential)
    assert set(engine_masks) == set(reference)
    for name, (scores, mask) in reference.items():
        if metric == "magnitude":
            assert torch.equal(engine_masks[name], mask), name
        else:
            assert_masks_match(engine_masks[name], scores, mask, pattern, sparsity, RTOL)
        # the weights under the mask are zero, the others untouched
        weight, kept = model.get_submodule(name).weight, ~engine_masks[name]
        assert (weight[~kept] == 0).all() and torch.equal(weight[kept], dense[name][kept])
    return report


@pytest.mark.parametrize("metric,pattern,sequential", TINY_CASES)
def test_tiny_llama_masks_match_reference(tiny_llama, tiny_calibration, metric, pattern, sequential):
    check_against_reference(tiny_llama, tiny_calibration, metric, pattern, sequential)


@pytest.mark.parametrize("pattern", ["unstructured", "unstructured-layer", "2:4"])
def test_tiny_llama_magnitude_matches_reference_exactly(tiny_llama, pattern):
    check_against_reference(tiny_llama, None, "magnitude", pattern, True)


def test_tiny_llama_reference_at_another_sparsity(tiny_llama, tiny_calibration):
    check_against_reference(tiny_llama, tiny_calibration, "wanda", "unstructured", True, sparsity=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("metric,pattern,sequential", CASES)
def test_smollm2_masks_match_reference(smollm2, smollm2_calibration, metric, pattern, sequential):
    check_against_reference(smollm2, smollm2_calibration, metric, pattern, sequential)


@pytest.mark.slow
def test_smollm2_magnitude_matches_reference_exactly(smollm2):
    # SmolLM2's weights are de-quantised Q4_1: a row has only ~200 distinct values,
    # so this exercises the lower-index tie rule on thousands of real ties.
    check_against_reference(smollm2, None, "magnitude", "unstructured", True)


def test_sequential_and_one_shot_really_differ_in_the_reference_protocol(tiny_llama, tiny_calibration):
    # Guards the comparisons above against a protocol mix-up that both sides share:
    # block 1's statistics, hence masks, must differ between the two protocols.
    seq = naive_prune(copy.deepcopy(tiny_llama), tiny_calibration, "wanda", "unstructured", 0.5, True)
    one = naive_prune(copy.deepcopy(tiny_llama), tiny_calibration, "wanda", "unstructured", 0.5, False)
    block0 = [n for n in seq if ".0." in n]
    block1 = [n for n in seq if ".1." in n]
    assert all(torch.equal(seq[n][1], one[n][1]) for n in block0)
    assert any(not torch.equal(seq[n][1], one[n][1]) for n in block1)


# ----------------------------------------------------------------------------------------
# SparseGPT


def naive_sparsegpt(weight: torch.Tensor, gram: torch.Tensor, count: int, pattern: str, sparsity: float,
                    blocksize: int = 128, percdamp: float = 0.01, update: bool = True):
    """OBS pruning as docs/design.md describes it, computed in ``weight``'s dtype.

    H = 2/N·XᵀX + λI (λ = percdamp·mean diag H; a never-active input gets H_jj = 1 and
    its weights zeroed); U = upper Cholesky factor of H⁻¹ (UᵀU = H⁻¹); saliency w²/U_jj².
    Blocks of ``blocksize`` columns: the block's mask is the pattern applied to the
    block's current saliencies (N:M: each group of M columns when the sweep reaches
    it). Column by column: zero the pruned entries and spread the error
    (w - q)/U_jj along row j of U over *all* later columns at once — the released code
    defers the part beyond the block (lazy update), which is the same sum.
    """
    w = weight.clone()
    rows, cols = w.shape
    h = gram.to(w.dtype) * (2.0 / count)
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=w.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    d = torch.diagonal(u)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    m = int(pattern.split(":")[1]) if ":" in pattern else None
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        if m is None:
            mask[:, start:stop] = naive_mask(w[:, start:stop] ** 2 / d[start:stop] ** 2, pattern, sparsity)
        for j in range(start, stop):
            if m is not None and (j - start) % m == 0:
                mask[:, j:j + m] = naive_mask(w[:, j:j + m] ** 2 / d[j:j + m] ** 2, pattern, sparsity)
            q = torch.where(mask[:, j], torch.zeros_like(w[:, j]), w[:, j])
            err = (w[:, j] - q) / u[j, j]
            w[:, j:] -= torch.outer(err, u[j, j:])
            w[:, j] = q
    if not update:
        return mask, weight.masked_fill(mask, 0.0)
    return mask, w


def layer_problem(rows=48, cols=320, tokens=512, seed=0, dtype=torch.float64):
    """A weight and input statistics with correlated, non-zero-mean inputs and one dead input."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    mix = torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, **f64) / cols ** 0.5
    x = torch.randn(tokens, cols, **f64) @ mix + 0.5 * torch.randn(cols, **f64)
    x[:, 5] = 0.0  # a dead input feature
    w = torch.randn(rows, cols, **f64)
    gram = x.t() @ x
    stats = LayerStats(LayerInfo("layer", 0, "layer"), tokens, gram=gram.to(dtype))
    return w.to(dtype), gram, stats


def solve(pattern: str, weight, stats, sparsity=0.5, **options):
    pat = get_plugins().patterns.get(pattern).cls.from_spec(pattern)
    r = SparseGPT(options).prune_layer(weight, stats, pat, pat.resolve_sparsity(None if ":" in pattern else sparsity))
    mask, new, details = r.mask, r.weight, r.details
    assert details == {}  # the damping was enough: nothing to record
    return mask, new


def test_sparsegpt_raises_the_damping_until_the_hessian_factors_and_records_it():
    # h = 2/N·gram = I except h[0,0] = -0.05; mean(diag h) ≈ 0.934, so percdamp 0.01 leaves
    # h[0,0] negative and 0.1 makes it positive: exactly one retry.
    gram = torch.eye(16) * 100.0
    gram[0, 0] = -5.0
    stats = LayerStats(LayerInfo("layer", 0, "layer"), 200, gram=gram)
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    pattern = get_plugins().patterns.get("unstructured").cls.from_spec("unstructured")
    r = SparseGPT().prune_layer(weight, stats, pattern, 0.5)
    mask, new, details = r.mask, r.weight, r.details
    assert details == {"percdamp": pytest.approx(0.1)}
    assert int(mask.sum()) == 8 * 8 and torch.isfinite(new).all()
    with pytest.raises(stadebench.NumericalError, match="percdamp=0.01 .0 retries"):
        SparseGPT({"damping_retries": 0}).prune_layer(weight, stats, pattern, 0.5)


@pytest.mark.parametrize("pattern", ["unstructured", "unstructured-layer", "2:4", "4:8"])
@pytest.mark.parametrize("update", [True, False])
def test_sparsegpt_solver_equals_naive_obs_in_float64(pattern, update):
    # Same algorithm in float64 on both sides: only summation order differs (~1e-13),
    # far below any saliency gap of continuous random data, so the masks must be equal
    # and the weights equal to ~1e-9 of their scale.
    weight, gram, stats = layer_problem()
    mask, new = solve(pattern, weight, stats, update=update)
    ref_mask, ref = naive_sparsegpt(weight, gram, stats.count, pattern, 0.5, update=update)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new, ref, rtol=0, atol=1e-9 * weight.abs().max().item())
    assert (new[mask] == 0).all()
    if not update:
        assert torch.equal(new[~mask], weight[~mask])  # kept weights untouched


def test_sparsegpt_blocksize_option_changes_the_per_block_selection():
    weight, gram, stats = layer_problem()
    mask64, new64 = solve("unstructured", weight, stats, blocksize=64)
    ref_mask, ref = naive_sparsegpt(weight, gram, stats.count, "unstructured", 0.5, blocksize=64)
    assert torch.equal(mask64, ref_mask)
    torch.testing.assert_close(new64, ref, rtol=0, atol=1e-9 * weight.abs().max().item())
    mask128, _ = solve("unstructured", weight, stats)
    assert not torch.equal(mask64, mask128)
    # per-row share of every 64-column block: exactly 32 pruned in each
    assert (mask64.reshape(48, 5, 64).sum(-1) == 32).all()


def test_sparsegpt_percdamp_option_is_used():
    weight, gram, stats = layer_problem()
    _, a = solve("2:4", weight, stats, percdamp=0.01)
    _, b = solve("2:4", weight, stats, percdamp=0.5)
    _, ref = naive_sparsegpt(weight, gram, stats.count, "2:4", 0.5, percdamp=0.5)
    torch.testing.assert_close(b, ref, rtol=0, atol=1e-9 * weight.abs().max().item())
    assert not torch.allclose(a, b)


def test_sparsegpt_reconstruction_beats_plain_masking():
    # The point of the update: lower output error ‖(W - Ŵ)X‖ than zeroing the same mask.
    weight, gram, stats = layer_problem()
    mask, new = solve("2:4", weight, stats)
    masked = weight.masked_fill(mask, 0.0)

    def err(w):
        d = weight - w
        return torch.trace(d @ gram @ d.t()).item()

    assert err(new) < 0.8 * err(masked)


def assert_sparsegpt_close(engine_w, ref_w, atol_rel, min_rows_identical=0.98):
    """Engine (float32) vs float64 reference for one layer.

    Tolerances: the engine forms H and its Cholesky factors in float32, so U carries a
    relative error of about cond(H)·2⁻²⁴; with λ = 1% of mean diag(H), cond(H) stays
    below ~10⁴, i.e. up to ~1e-3 relative on U, hence on the reconstructed weights
    (measured: ≤ 3e-5 of max|W| on the tiny Llama, ≤ 7e-4 on SmolLM2's block 0). Such
    a perturbation can flip a near-tie between two saliencies; the error feedback runs
    along rows, so a flip changes only the rest of that row. Hence: zero patterns agree
    on ≥ 99.9% of the weights and fully on ≥ ``min_rows_identical`` of the rows; on
    those rows the weights agree within ``atol_rel``·max|W|; and the layer's
    reconstruction error tr(ΔW·XᵀX·ΔWᵀ), which ignores which twin of a near-tie went,
    agrees within 1%.
    """
    engine_w = engine_w.detach().double()
    e0, r0 = engine_w == 0, ref_w == 0
    assert (e0 == r0).double().mean() >= 0.999
    rows = (e0 == r0).all(1)
    assert rows.double().mean() >= min_rows_identical
    torch.testing.assert_close(engine_w[rows], ref_w[rows], rtol=0, atol=atol_rel * ref_w.abs().max().item())
    return rows


@pytest.mark.parametrize("pattern", ["unstructured", "unstructured-layer", "2:4", "4:8"])
def test_sparsegpt_solver_in_float32_is_close_to_the_float64_reference(pattern):
    # A single layer as the engine hands it over: float32 weight and Gram matrix.
    weight, gram, stats = layer_problem()
    stats32 = LayerStats(stats.layer, stats.count, gram=gram.float())
    mask, new = solve(pattern, weight.float(), stats32)
    assert new.dtype == torch.float32 and (new[mask] == 0).all()
    _, ref = naive_sparsegpt(weight, gram, stats.count, pattern, 0.5)
    assert_sparsegpt_close(new, ref, atol_rel=1e-4, min_rows_identical=0.99)
    assert reconstruction_error(weight, new, gram) == pytest.approx(reconstruction_error(weight, ref, gram), rel=1e-3)


def reconstruction_error(dense, pruned, gram):
    d = dense.double() - pruned.double()
    return torch.einsum("ij,jk,ik->", d, gram, d).item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_engine_matches_naive_on_tiny_llama_blocks(tiny_llama, tiny_calibration, pattern):
    dense = copy.deepcopy(tiny_llama)
    stadebench.prune(tiny_llama, tiny_calibration, metric="sparsegpt", pattern=pattern, sequential=True)
    # block 0 sees the embeddings; block 1 sees the *engine's* pruned block 0 (a dense
    # model with block 0 replaced), which isolates the block-1 comparison from float
    # differences in block 0.
    hybrid = copy.deepcopy(dense)
    hybrid.model.layers[0] = copy.deepcopy(tiny_llama.model.layers[0])
    inputs = {**capture_inputs(dense, tiny_calibration, [0]), **capture_inputs(hybrid, tiny_calibration, [1])}
    for (k, name), x in inputs.items():
        w = dense.model.layers[k].get_submodule(name).weight.detach().double()
        gram = x.t() @ x
        _, ref = naive_sparsegpt(w, gram, x.shape[0], pattern, 0.5)
        engine_w = tiny_llama.model.layers[k].get_submodule(name).weight
        assert_sparsegpt_close(engine_w, ref, atol_rel=2e-4, min_rows_identical=0.99)
        assert reconstruction_error(w, engine_w, gram) == pytest.approx(reconstruction_error(w, ref, gram), rel=1e-2)


@pytest.mark.slow
def test_sparsegpt_engine_matches_naive_on_smollm2_block0(smollm2, smollm2_calibration):
    dense = copy.deepcopy(smollm2)
    stadebench.prune(smollm2, smollm2_calibration, metric="sparsegpt", pattern="2:4", sequential=True)
    inputs = capture_inputs(dense, smollm2_calibration, [0])
    for (k, name), x in inputs.items():
        if name == "mlp.down_proj":  # 1536 columns: the naive column loop is too slow here
            continue
        w = dense.model.layers[0].get_submodule(name).weight.detach().double()
        gram = x.t() @ x
        _, ref = naive_sparsegpt(w, gram, x.shape[0], "2:4", 0.5)
        engine_w = smollm2.model.layers[0].get_submodule(name).weight
        assert_sparsegpt_close(engine_w, ref, atol_rel=2e-3)
        assert reconstruction_error(w, engine_w, gram) == pytest.approx(reconstruction_error(w, ref, gram), rel=1e-2)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_update_false_keeps_the_mask_and_the_dense_kept_weights(tiny_llama, tiny_calibration, pattern):
    # One-shot, so that every block sees the same (dense) inputs in both runs.
    updated = copy.deepcopy(tiny_llama)
    stadebench.prune(updated, tiny_calibration, metric="sparsegpt", pattern=pattern, sequential=False)
    plain = copy.deepcopy(tiny_llama)
    report = stadebench.prune(plain, tiny_calibration, metric="sparsegpt", pattern=pattern, sequential=False,
                              metric_options={"update": False})
    assert report.metric_options["update"] is False
    for (name, layer), (_, dense_layer), (_, up_layer) in zip(
            plain.named_modules(), tiny_llama.named_modules(), updated.named_modules()):
        if not isinstance(layer, nn.Linear) or name == "lm_head":
            continue
        mask = up_layer.weight == 0
        assert torch.equal(layer.weight == 0, mask), name
        assert torch.equal(layer.weight[~mask], dense_layer.weight[~mask]), name
        assert not torch.equal(up_layer.weight[~mask], dense_layer.weight[~mask]), name


# ----------------------------------------------------------------------------------------
# random


def random_masks(model, seed, pattern="unstructured"):
    stadebench.prune(model, None, metric="random", pattern=pattern, metric_options={"seed": seed})
    return {name: (layer.weight == 0) for name, layer in model.named_modules()
            if isinstance(layer, nn.Linear) and name != "lm_head"}


def test_random_is_deterministic_under_a_seed_and_ignores_the_global_rng(tiny_factory):
    torch.manual_seed(1)
    a = random_masks(tiny_factory("llama"), seed=7)
    torch.manual_seed(2)
    b = random_masks(tiny_factory("llama"), seed=7)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_random_differs_across_seeds_and_across_layers(tiny_factory):
    a = random_masks(tiny_factory("llama"), seed=0)
    b = random_masks(tiny_factory("llama"), seed=1)
    assert all(not torch.equal(a[n], b[n]) for n in a)
    # same shape, different layers: independent draws
    assert not torch.equal(a["model.layers.0.self_attn.q_proj"], a["model.layers.1.self_attn.q_proj"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj"], a["model.layers.0.self_attn.o_proj"])


def test_random_does_not_depend_on_weights_or_on_layer_order(tiny_factory):
    # Different weights, same layer names: same masks.
    a = random_masks(tiny_factory("llama", seed=0), seed=3, pattern="2:4")
    b = random_masks(tiny_factory("llama", seed=5), seed=3, pattern="2:4")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # Scoring the layers in another order (with draws from the global RNG in between)
    # gives every layer the same scores.
    metric = get_plugins().metrics.get("random").cls({"seed": 3})
    names = list(a)
    w = torch.zeros(8, 16)
    forward = {n: metric.score(w, LayerStats(LayerInfo(n, 0, n))) for n in names}
    backward = {}
    for n in reversed(names):
        torch.randn(5)
        backward[n] = metric.score(w, LayerStats(LayerInfo(n, 0, n)))
    assert all(torch.equal(forward[n], backward[n]) for n in names)
    assert forward[names[0]].shape == w.shape and forward[names[0]].std() > 0.5


# ----------------------------------------------------------------------------------------
# STADE statistics and bias correction


@pytest.mark.parametrize("mean", [30.0, 100.0, 300.0])
def test_stade_variance_is_accurate_for_inputs_whose_mean_dwarfs_their_spread(mean):
    # LLM activations have channels with |μ| ≫ σ (the case STADE exists for). The
    # unbiased variance must not drown in rounding: float64 accumulation of Σx and Σx²
    # (or a shifted/Welford update) gives ~1e-10 here; 1e-4 relative is a loose bar.
    from stadebench.core.statistics import Accumulator

    g = torch.Generator().manual_seed(0)
    x = (mean + torch.randn(8, 512, 16, generator=g)).float()  # 8 batches, 4096 tokens, 16 inputs
    acc = Accumulator(frozenset({"sum", "sumsq"}))
    for batch in x:
        acc.add(batch)
    stats = acc.stats(LayerInfo("l", 0, "l"))
    reference = x.reshape(-1, 16).double().var(0, unbiased=True)
    assert stats.count == 4096
    torch.testing.assert_close(stats.mean.double(), x.reshape(-1, 16).double().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.var.double(), reference, rtol=1e-4, atol=0)


def _out_in(mod):
    """The weight as [out, in] (transformers' Conv1D stores [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return mod.weight.t() if isinstance(mod, Conv1D) else mod.weight


def _prunable(model):
    from transformers.pytorch_utils import Conv1D

    out_emb = model.get_output_embeddings()
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear | Conv1D) and mod is not out_emb}


def prune_recording_pass1_inputs(model, calibration, metric, pattern="unstructured", **kwargs):
    """Prune; return (report, dense {name: (W [out,in], b)}, {name: pass-1 inputs float64 [T, in]}).

    A plain forward hook on every prunable layer keeps the inputs seen while the layer
    still has its dense weight: the statistics pass of its block.
    """
    layers = _prunable(model)
    dense = {}
    for name, mod in layers.items():
        dense[name] = (_out_in(mod).detach().clone(), None if mod.bias is None else mod.bias.detach().clone())
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in layers.items():
        raw = mod.weight.detach().clone()

        def hook(module, args, output, name=name, raw=raw):
            if torch.equal(module.weight, raw):
                x = args[0].detach()
                seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).double())
        handles.append(mod.register_forward_hook(hook))
    try:
        report = stadebench.prune(model, calibration, metric=metric, pattern=pattern, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return report, dense, {n: torch.cat(v) for n, v in seen.items()}


def check_mean_outputs(model, report, dense, inputs, corrected: set[str]):
    """Layers in ``corrected`` keep their mean output over their pass-1 inputs; the others
    keep their bias exactly (or have none)."""
    layers = _prunable(model)
    by_name = {layer.name: layer for layer in report.layers}
    drifted = 0
    for name, mod in layers.items():
        w_d, b_d = dense[name]
        if name not in corrected:
            assert (mod.bias is None) == (b_d is None), name
            if b_d is not None:
                assert torch.equal(mod.bias, b_d), name
            assert not by_name[name].bias_added
            continue
        x = inputs[name]
        b0 = torch.zeros(w_d.shape[0], dtype=torch.float64) if b_d is None else b_d.double()
        dense_mean = x.mean(0) @ w_d.double().t() + b0
        with torch.no_grad():
            pruned_mean = mod(x.float()).double().mean(0)  # the module's own forward, bias included
        # float32 forward: per-token rounding ≤ in·2⁻²⁴·Σ|W_ij x_j| (≤ 1e-4 of it for in ≤ 1536)
        scale = (x.abs() @ w_d.double().abs().t()).mean(0) + b0.abs()
        err = (pruned_mean - dense_mean).abs()
        assert (err <= 1e-4 * scale + 1e-7).all(), f"{name}: mean output moved by up to {err.max():.3g}"
        assert mod.bias is not None
        assert by_name[name].bias_added == (b_d is None)
        # not vacuous: without the correction the mean would have moved well beyond the tolerance
        uncorrected = (x.mean(0) @ _out_in(mod).double().t() + b0 - dense_mean).abs()
        drifted += int((uncorrected > 10 * (1e-4 * scale + 1e-7)).double().mean() > 0.5)
    assert drifted >= len(corrected) // 2
    return drifted


def names_ending(model, suffixes):
    return {n for n in _prunable(model) if n.endswith(suffixes)}


@pytest.mark.parametrize("sequential", [True, False])
def test_stade_bias_keeps_every_layer_mean_output_on_tiny_llama(tiny_llama, tiny_calibration, sequential):
    report, dense, inputs = prune_recording_pass1_inputs(tiny_llama, tiny_calibration, "stade",
                                                         sequential=sequential)
    check_mean_outputs(tiny_llama, report, dense, inputs, corrected=set(_prunable(tiny_llama)))


@pytest.mark.parametrize("family,pattern", [("gpt2", "unstructured"), ("qwen2", "2:4"), ("opt", "unstructured")])
def test_stade_bias_with_existing_biases_and_conv1d(tiny_factory, tiny_calibration, family, pattern):
    model = tiny_factory(family)
    report, dense, inputs = prune_recording_pass1_inputs(model, tiny_calibration, "stade", pattern=pattern)
    check_mean_outputs(model, report, dense, inputs, corrected=set(_prunable(model)))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_stade_w_corrects_only_internal_layers(tiny_factory, tiny_calibration, family):
    model = tiny_factory(family)
    report, dense, inputs = prune_recording_pass1_inputs(model, tiny_calibration, "stade-w")
    internal = {layer.name for layer in report.layers if layer.role == "internal"}
    assert internal == names_ending(model, ("o_proj", "down_proj", "c_proj"))
    check_mean_outputs(model, report, dense, inputs, corrected=internal)


@pytest.mark.parametrize("metric", ["stade", "stade-w"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bias_correction_false_leaves_biases_alone(tiny_factory, tiny_calibration, family, metric):
    model = tiny_factory(family)
    report, dense, inputs = prune_recording_pass1_inputs(model, tiny_calibration, metric,
                                                         metric_options={"bias_correction": False})
    assert report.metric_options == {"bias_correction": False}
    check_mean_outputs(model, report, dense, inputs, corrected=set())
    if family == "llama":
        assert all(mod.bias is None for mod in _prunable(model).values())


def test_created_bias_is_used_by_the_model_forward(tiny_llama, tiny_calibration):
    stadebench.prune(tiny_llama, tiny_calibration, metric="stade")
    o_proj = tiny_llama.model.layers[1].self_attn.o_proj
    assert o_proj.bias is not None and o_proj.bias.abs().max() > 0
    assert "bias" in dict(o_proj.named_parameters())
    seen = {}
    handle = o_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        with_bias = tiny_llama(tiny_calibration[:2]).logits
    handle.remove()
    torch.testing.assert_close(seen["y"], seen["x"] @ o_proj.weight.t() + o_proj.bias)
    for mod in _prunable(tiny_llama).values():
        mod.bias = None
    with torch.no_grad():
        without = tiny_llama(tiny_calibration[:2]).logits
    assert not torch.allclose(with_bias, without)


def test_created_biases_survive_save_and_reload(tiny_llama, tiny_calibration, tmp_path):
    # docs/design.md: a layer with no bias gets one; saving such a model must set the config
    # flags (Llama attention_bias / mlp_bias) so that it reloads with them.
    from transformers import AutoModelForCausalLM

    stadebench.prune(tiny_llama, tiny_calibration, metric="stade-w")
    with torch.no_grad():
        before = tiny_llama(tiny_calibration[:2]).logits
    tiny_llama.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[0].self_attn.o_proj.bias is not None
    with torch.no_grad():
        after = reloaded(tiny_calibration[:2]).logits
    torch.testing.assert_close(after, before)


@pytest.mark.slow
def test_stade_bias_on_smollm2(smollm2, smollm2_calibration):
    report, dense, inputs = prune_recording_pass1_inputs(smollm2, smollm2_calibration, "stade", pattern="2:4")
    check_mean_outputs(smollm2, report, dense, inputs, corrected=set(_prunable(smollm2)))


def _released_and_ours(x: torch.Tensor, needs=frozenset({"sum", "sumsq", "gram"})):
    from stadebench.core.statistics import Accumulator, ReleasedAccumulator

    info = LayerInfo("l", 0, "l")
    ours, released = Accumulator(needs), ReleasedAccumulator(needs)
    for batch in x:
        ours.add(batch)
        released.add(batch)
    return ours.stats(info), released.stats(info)


def test_released_accumulation_updates_one_window_at_a_time_as_the_releases_do():
    # a batch of windows is the same running update as the windows fed one by one
    from stadebench.core.statistics import ReleasedAccumulator

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 32, 8, generator=g)  # 6 windows of 32 tokens, 8 inputs
    info = LayerInfo("l", 0, "l")
    batched, single = ReleasedAccumulator(frozenset(STATISTICS)), ReleasedAccumulator(frozenset(STATISTICS))
    batched.add(x[:4])
    batched.add(x[4:])
    for window in x:
        single.add(window[None])
    a, b = batched.stats(info), single.stats(info)
    assert a.count == b.count == 6 * 32
    for name in ("sum", "sumsq", "gram", "m2"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # the running (2/n)·XᵀX and mean of ‖x_j‖² per window, written out
    flat = x.reshape(-1, 8).double()
    torch.testing.assert_close(a.sumsq.double(), (flat * flat).sum(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(a.gram.double(), flat.t() @ flat, rtol=1e-4, atol=1e-4)


def test_released_accumulation_matches_float64_sums_up_to_float32_rounding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 64, 16, generator=g) * 3 + 0.5
    ours, released = _released_and_ours(x)
    assert ours.count == released.count == 4 * 2 * 64
    for name in ("sum", "sumsq", "gram", "m2"):
        mine, theirs = getattr(ours, name).double(), getattr(released, name).double()
        assert not torch.equal(mine, theirs) or name == "sum"  # rounded otherwise, yet close
        torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-3)


def test_released_variance_loses_digits_where_the_mean_dwarfs_the_spread():
    # why float64 is the default: the releases' one-pass update cancels Σx² against n·mean²
    g = torch.Generator().manual_seed(0)
    x = (300.0 + torch.randn(8, 512, 16, generator=g)).float()
    ours, released = _released_and_ours(x[:, None], needs=frozenset({"sum", "sumsq"}))
    reference = x.reshape(-1, 16).double().var(0, unbiased=True)
    error = lambda s: ((s.var.double() - reference).abs() / reference).max().item()  # noqa: E731
    assert error(ours) < 1e-6
    assert error(released) > 100 * error(ours)
