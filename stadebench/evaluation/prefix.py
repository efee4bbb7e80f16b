"""Shared-prefix log-likelihoods for lm-eval: each distinct context runs once.

A multiple-choice document asks for log P(continuation | context) once per choice with
the same context (ARC 4x, HellaSwag 4x, PIQA 2x); lm-eval's ``HFLM`` runs the whole
context again for every choice, pads each batch to its longest request and takes the
log-softmax over the vocabulary at every position, context included. ``SharedPrefixLM``
answers the same requests in two passes per batch of distinct contexts:

1. the contexts but their last token, right-padded, keeping their keys and values; the
   language-model head runs for the last position only;
2. every choice of those contexts over that cache (each context's rows of the cache
   repeated for its choices), each row ``[last context token] + continuation[:-1]`` at
   the positions that follow its own context, the context's padding masked out; the
   log-softmax is taken at the continuation's positions only.

Both passes are batched by length, longest first, each holding at most as many padded
tokens as lm-eval's longest batch would (the batch size times the longest request) and
at most ``MAX_PADDING`` (25%) padding: short rows (a choice of a few tokens) fill a pass,
and rows of unlike lengths do not share one.

Everything else (request order, lm-eval's caching hook, what a request returns) is
lm-eval's. The values equal the stock path's up to float rounding (the same operations in
other shapes): tests/test_prefix.py holds them within 1e-4 in float32 (two float32 steps
beyond ±1024) with ``is_greedy`` identical. Requests the shared path cannot serve go the
stock way: a context and continuation longer than the model's window (lm-eval truncates
them from the left), a sequence-to-sequence model, a model that takes no position ids or
returns no key/value cache.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

Request = tuple[tuple[str, str] | None, list[int], list[int]]
Answer = tuple[float, bool]


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def servable(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward takes what the shared path passes (position ids, a cache)."""
    params = _forward_parameters(type(model))
    return "position_ids" in params and ("cache" in params or "past_key_values" in params)


def _padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def score_contexts(model: torch.nn.Module, contexts: list[list[int]], choices: list[list[list[int]]],
                   softmax_dtype: torch.dtype | None, device: torch.device, budget: int,
                   counts: dict[str, int] | None = None) -> list[list[Answer]] | None:
    """``(log-likelihood, is_greedy)`` of every continuation ``choices[i][j]`` after
    ``contexts[i]``: one pass of the contexts, then the choices, longest first, in passes
    of at most ``budget`` padded tokens (see the module docstring). ``counts`` gathers
    ``tokens`` and ``padding`` of every pass. None when the model returns no cache (the
    caller goes the stock way)."""
    params = _forward_parameters(type(model))
    cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed within transformers 5
    counts = {} if counts is None else counts
    prefixes = [c[:-1] for c in contexts]
    cache = prefix_mask = None
    if max(len(p) for p in prefixes):
        ids, prefix_mask = _padded(prefixes, device)
        _count(counts, prefix_mask)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        out = model(input_ids=ids, attention_mask=prefix_mask, use_cache=True, **keep)
        cache = out.cache if "cache" in params else out.past_key_values
        if cache is None or not hasattr(cache, "batch_select_indices"):
            return None
    rows = [(i, j) for i, conts in enumerate(choices) for j in range(len(conts))]
    rows.sort(key=lambda ij: -len(choices[ij[0]][ij[1]]))
    passes = [[rows[k] for k in group] for group in packed([len(choices[i][j]) for i, j in rows], budget)]
    answers: list[list[Answer | None]] = [[None] * len(conts) for conts in choices]
    for n, members in enumerate(passes):
        owner = [i for i, _ in members]
        ids, mask = _padded([[contexts[i][-1], *choices[i][j][:-1]] for i, j in members], device)
        _count(counts, mask)
        starts = torch.tensor([len(prefixes[i]) for i in owner], device=device)
        kwargs: dict[str, Any] = {"position_ids": starts[:, None] + torch.arange(ids.shape[1], device=device)}
        if cache is not None:
            past = cache if n == len(passes) - 1 else copy.deepcopy(cache)
            past.batch_select_indices(torch.tensor(owner, device=device))
            kwargs[cache_kwarg] = past
            mask = torch.cat([prefix_mask[owner], mask], dim=1)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=cache is not None, **kwargs).logits
        for r, (i, j) in enumerate(members):
            target = torch.tensor(choices[i][j], dtype=torch.long, device=device)
            logprobs = F.log_softmax(logits[r, :len(target)], dim=-1, dtype=softmax_dtype)
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            answers[i][j] = (float(logprobs.gather(1, target[:, None]).sum()), greedy)
    return answers


def _count(counts: dict[str, int], mask: torch.Tensor) -> None:
    real = int(mask.sum())
    counts["tokens"] = counts.get("tokens", 0) + real
    counts["padding"] = counts.get("padding", 0) + mask.numel() - real


MAX_PADDING = 0.25
"""The most padding a pass may hold, as a share of its tokens (a row that would take it over
starts the next pass)."""


def packed(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Indices of ``lengths`` (longest first) in passes of at most ``budget`` padded tokens
    and ``MAX_PADDING`` padding: a pass's width is its first row's."""
    group: list[int] = []
    real = 0
    for k, length in enumerate(lengths):
        if group:
            width = lengths[group[0]]
            size = (len(group) + 1) * width
            if size > budget or size - real - length > MAX_PADDING * size:
                yield group
                group, real = [], 0
        group.append(k)
        real += length
    if group:
        yield group


def batches(contexts: list[tuple[int, ...]], budget: int) -> Iterator[list[tuple[int, ...]]]:
    """Contexts in prefix passes (``packed`` by the length of the prefix, longest first: a
    pass that cannot fit fails at once, as in lm-eval); one-token contexts, which have no
    prefix to pass (a row of padding alone would attend to nothing), apart."""
    ordered = sorted(contexts, key=lambda c: (-len(c), c))
    single = [c for c in ordered if len(c) == 1]
    longer = [c for c in ordered if len(c) > 1]
    for group in packed([len(c) - 1 for c in longer], budget):
        yield [longer[k] for k in group]
    if single:
        yield single


@functools.cache
def shared_prefix_class() -> type:
    """``SharedPrefixLM``: lm-eval's ``HFLM`` answering ``loglikelihood`` requests by
    shared prefixes (built on first use: lm-eval is an optional dependency)."""
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    class SharedPrefixLM(HFLM):
        """``HFLM`` whose log-likelihood requests share each distinct context's forward pass."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.counts: dict[str, int] = {"tokens": 0, "padding": 0}
            """Real and padding tokens of every shared-prefix pass so far."""

        def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[Answer]:
            if self.backend != "causal" or not servable(self.model):
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            answers: list[Answer | None] = [None] * len(requests)
            stock: list[int] = []
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (_, context, continuation) in enumerate(requests):
                if not context or not continuation or len(context) + len(continuation) > self.max_length + 1:
                    stock.append(i)
                else:
                    groups.setdefault(tuple(context), []).append(i)
            size = self.batch_size if isinstance(self.batch_size, int) else (override_bs or 8)
            # a pass holds as many padded tokens as lm-eval's first (longest) batch would
            budget = size * max((len(requests[i][1]) + len(requests[i][2]) for m in groups.values() for i in m),
                                default=1)
            bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                       desc="Running loglikelihood requests")  # lm-eval's own bar, as its path shows it
            for batch in batches(list(groups), budget):
                with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                     enabled=self.mixed_precision_dtype is not None):
                    scored = score_contexts(self.model, [list(c) for c in batch],
                                            [[requests[i][2] for i in groups[c]] for c in batch], self.softmax_dtype,
                                            self.device, budget, self.counts)
                if scored is None:  # no key/value cache from this model: lm-eval's own path for all
                    stock += [i for c in batch for i in groups[c]]
                    continue
                for context, results in zip(batch, scored):
                    for i, answer in zip(groups[context], results):
                        answers[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(len(results))
            bar.close()
            if stock:
                stock.sort()
                done = super()._loglikelihood_tokens([requests[i] for i in stock], disable_tqdm, override_bs)
                for i, answer in zip(stock, done):
                    answers[i] = answer
            return answers

    return SharedPrefixLM


__all__ = ["batches", "score_contexts", "servable", "shared_prefix_class"]
