"""Perplexity of an in-memory causal LM on a registered text dataset.

The evaluation stream (``stadebench.data.calibration.eval_tokens``) is cut into
⌊T/seqlen⌋ non-overlapping windows, the tail dropped (and at most
``dataset.eval_windows`` of them: 256 for C4). PPL = exp(total next-token NLL / total
predicted tokens); all windows have the same length, so this equals exp of the mean
of per-window mean losses, as in Wanda/SparseGPT.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from ..base import CellContext, Dataset, Evaluator, Options, Score
from ..core.models import check_context
from ..data.calibration import eval_tokens
from ..errors import ConfigError
from ..hookspecs import hookimpl


class DatasetRef(Options):
    """A dataset with options, e.g. ``{name: text, options: {path: notes.txt}}``."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class Perplexity(Evaluator):
    """Perplexity over non-overlapping windows of a dataset's evaluation split."""

    name = "perplexity"
    version = "1"

    class Options(Options):
        dataset: str | DatasetRef = Field("wikitext2", description="dataset name, or {name, options}")
        split: str | None = Field(None, description="split to evaluate; default the dataset's eval_split")
        seqlen: int = Field(2048, ge=2, le=1 << 20, description="tokens per window")
        batch_size: int = Field(8, ge=1, le=65_536, description="windows per forward pass")
        max_windows: int | None = Field(None, ge=1, le=(1 << 31) - 1, description="evaluate only the first k windows")

    def dataset(self) -> Dataset:
        """The dataset the options name, built with its options."""
        from ..plugins import get_plugins

        ref = self.options.dataset
        name, options = (ref, {}) if isinstance(ref, str) else (ref.name, ref.options)
        return get_plugins().datasets.get(name).cls(options)

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.split is None:  # record the split actually evaluated
            self.options = self.options.model_copy(update={"split": self.dataset().eval_split})

    def unavailable(self) -> str | None:
        return self.dataset().unavailable()

    def check(self) -> None:
        """The dataset's own check."""
        self.dataset().check()

    def check_model(self, config: Any) -> None:
        """Windows of ``seqlen`` tokens fit the model's context."""
        check_context(config, self.options.seqlen, "seqlen")

    def fingerprint(self) -> str | None:
        """The evaluated dataset's fingerprint."""
        return self.dataset().fingerprint()

    reuses_cell = True  # fidelity's forward pass over the same windows gives the same sums

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, device: torch.device | str | None = None,
                 cell: CellContext | None = None) -> list[Score]:
        """Perplexity of ``model`` as it is now; ``device`` defaults to the model's. The
        per-window NLL another evaluation of the cell computed on the same windows in the same
        batches (``cell.shared``) is taken as it is rather than computed again."""
        ids, details = self.windows(model, tokenizer)
        nll = None if cell is None else cell.shared.get(shared_nll_key(ids, self.options.batch_size))
        details["shared_pass"] = nll is not None
        if nll is None:
            with placed(model, device) as dev:
                nll = window_nll(model, ids, self.options.batch_size, dev)
        predicted = ids.shape[1] - 1
        ppl = float(torch.tensor(sum(nll) / details["predicted_tokens"], dtype=torch.float64).exp())  # inf on overflow
        return [Score(task=self.dataset().name, name="ppl", value=ppl, stderr=None, higher_is_better=False,
                      details=details, items=window_items([t / predicted for t in nll], predicted),
                      aggregate="exp_mean")]

    def windows(self, model: torch.nn.Module, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The evaluated windows, LongTensor ``[windows, seqlen]``, and what they are (the
        score's details)."""
        opts = self.options
        dataset = self.dataset()
        split = opts.split or dataset.eval_split
        _check_positions(model, opts.seqlen, self.name)
        stream = eval_tokens(dataset, tokenizer, split)
        windows = stream.numel() // opts.seqlen
        if windows == 0:
            raise ConfigError(f"{self.name}: the {split} split of {dataset.name!r} has {stream.numel()} tokens, "
                              f"fewer than one window of seqlen={opts.seqlen}; use a smaller seqlen")
        windows = min(w for w in (windows, dataset.eval_windows, opts.max_windows) if w is not None)
        details = {"windows": windows, "tokens": windows * opts.seqlen, "predicted_tokens": windows * (opts.seqlen - 1),
                   "stream_tokens": stream.numel(), "seqlen": opts.seqlen, "split": split,
                   "max_windows": opts.max_windows, "dataset_fingerprint": dataset.fingerprint()}
        return stream[: windows * opts.seqlen].view(windows, opts.seqlen), details


def window_nll(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device) -> list[float]:
    """Summed next-token cross-entropy (nats, float64) of each row of ``ids`` ``[windows, seqlen]``."""
    sums = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in ids.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                sums += row_nll(logits, batch)
                del logits
    finally:
        model.train(was_training)
    return sums


def row_nll(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Summed next-token cross-entropy (nats, float64) of each row of ``batch`` from its ``logits``."""
    labels = batch.to(logits.device)
    # One window at a time: float32 logits of a whole batch can take GBs.
    losses = [F.cross_entropy(logits[row, :-1].float(), labels[row, 1:], reduction="sum")
              for row in range(batch.shape[0])]
    return torch.stack(losses).double().tolist()


def shared_nll_key(ids: torch.Tensor, batch_size: int) -> tuple[str, str, int]:
    """The ``CellContext.shared`` key of the per-window NLL of windows ``ids`` in batches of
    ``batch_size`` (the same windows in the same batches give the same sums, bit for bit)."""
    return "window_nll", hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest(), batch_size


def total_nll(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Sum of next-token cross-entropies (nats) over the rows of ``ids`` ``[windows, seqlen]``."""
    return sum(window_nll(model, ids, batch_size, device))


def window_items(means: list[float], predicted: int) -> list[dict[str, float]]:
    """``Score.items`` of windows that predict ``predicted`` tokens each: the window's index,
    its mean per token, and the tokens as its weight."""
    return [{"id": i, "value": mean, "weight": predicted} for i, mean in enumerate(means)]


def _check_positions(model: torch.nn.Module, seqlen: int, who: str = "perplexity") -> None:
    check_context(getattr(model, "config", None), seqlen, f"{who}: seqlen")


@contextlib.contextmanager
def placed(model: torch.nn.Module, device: torch.device | str | None):
    """Yield the device inputs go to; a single-device model is moved there and back."""
    home = model.get_input_embeddings().weight.device
    target = home if device is None else torch.device(device)
    same = target.type == home.type and target.index in (None, home.index)
    if same or getattr(model, "hf_device_map", None):  # dispatched models stay where they are
        yield home
        return
    model.to(target)
    try:
        yield target
    finally:
        model.to(home)


@hookimpl
def register_evaluators(register):
    register(Perplexity)


__all__ = ["DatasetRef", "Perplexity", "placed", "row_nll", "shared_nll_key", "total_nll", "window_items",
           "window_nll"]
