"""Fidelity to the dense model: how far pruning moved the next-token distribution.

On the windows perplexity would evaluate (the same options: dataset, split, seqlen,
max_windows, batch_size), at every predicted position t of every window:

    KL_t = Σ_v p_dense(v | x_<t) · (log p_dense(v | x_<t) − log p_pruned(v | x_<t))

over the whole vocabulary (exact, no top-k), in float32 from each model's logits, and
whether both models' top-1 tokens agree. Scores: ``kl``, the mean of KL_t over all
predicted tokens (nats), and ``top1_agreement``, the share of them whose top-1 is
unchanged; each with its per-window values as its items (``Score.items``). The dense model's outputs come
from the cell's own model with its dense weights swapped in for each batch
(``CellContext.dense``), so nothing of the model's size is kept; the dense baseline is
compared with itself: KL 0, agreement 1, computed like any other cell.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ..base import CellContext, Score
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .perplexity import Perplexity, placed, row_nll, shared_nll_key, window_items


class Divergence(NamedTuple):
    """Per window: mean KL(dense ‖ pruned) per predicted token, the share of predicted tokens
    whose top-1 agrees, and the pruned model's summed NLL (what perplexity computes)."""

    kl: list[float]
    agree: list[float]
    nll: list[float]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of the next token at every predicted position ``[b, seqlen - 1, vocab]``."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def divergence(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device,
               dense: Any) -> Divergence:
    """KL to the dense model, top-1 agreement and NLL per window of ``ids``, one pruned forward
    pass per batch; ``dense()`` swaps the dense weights in."""
    out = Divergence([], [], [])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # not inference mode: dense() writes the model's weights in place
            for batch in ids.split(batch_size):
                batch = batch.to(device)
                with dense():
                    reference = _log_probs(model(input_ids=batch, use_cache=False).logits)
                logits = model(input_ids=batch, use_cache=False).logits
                out.nll.extend(row_nll(logits, batch))
                pruned = _log_probs(logits)
                del logits
                per_token = F.kl_div(pruned, reference, reduction="none", log_target=True).sum(-1)
                same = reference.argmax(-1) == pruned.argmax(-1)
                out.kl.extend(per_token.double().mean(-1).tolist())
                out.agree.extend(same.double().mean(-1).tolist())
                del reference, pruned
    finally:
        model.train(was_training)
    return out


class Fidelity(Perplexity):
    """KL divergence from the dense model's next-token distribution, and top-1 agreement."""

    name = "fidelity"
    version = "1"
    needs_cell = True

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, device: torch.device | str | None = None,
                 cell: CellContext | None = None) -> list[Score]:
        """Compare ``model`` with its dense weights (``cell.dense``) on the windows."""
        if cell is None:
            raise ConfigError("fidelity compares a pruned model with its dense weights: it runs within a suite's "
                              "cell (or pass a CellContext whose dense() swaps them in)")
        ids, details = self.windows(model, tokenizer)
        with placed(model, device) as dev:
            kl, agree, nll = divergence(model, ids, self.options.batch_size, dev, cell.dense)
        cell.shared[shared_nll_key(ids, self.options.batch_size)] = nll  # perplexity on these windows: no pass
        task = self.dataset().name
        windows, predicted = len(kl), ids.shape[1] - 1
        # every window predicts seqlen - 1 tokens: the mean over tokens is the mean over windows
        return [Score(task=task, name="kl", value=sum(kl) / windows, stderr=None, higher_is_better=False,
                      details=details, items=window_items(kl, predicted), aggregate="mean"),
                Score(task=task, name="top1_agreement", value=sum(agree) / windows, stderr=None,
                      higher_is_better=True, details=details, items=window_items(agree, predicted), aggregate="mean")]


@hookimpl
def register_evaluators(register):
    register(Fidelity)


__all__ = ["Divergence", "Fidelity", "divergence"]
