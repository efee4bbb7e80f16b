"""Shared-prefix log-likelihoods for lm-eval: each distinct context runs once.

A multiple-choice document asks for log P(continuation | context) once per choice with
the same context (ARC 4x, HellaSwag 4x, PIQA 2x); lm-eval's ``HFLM`` runs the whole
context again for every choice, pads each batch to its longest request and takes the
log-softmax over the vocabulary at every position, context included. ``SharedPrefixLM``
answers the same requests from one forward pass of each distinct context but its last
token (its keys and values kept), then one batched pass of the choices over that cache,
each row ``[last context token] + continuation[:-1]``, and takes the log-softmax only at
the continuation's positions. Everything else (request order, caching hooks, what a
request returns) is lm-eval's.

The values equal the stock path's up to float rounding (the same operations, in other
shapes): tests/test_prefix.py holds every request's log-likelihood within 1e-4 of the
stock value in float32 and ``is_greedy`` identical. Requests the shared path cannot serve
go the stock way: a context and continuation longer than the model's window (lm-eval
truncates them from the left), a sequence-to-sequence model, a model that returns no
key/value cache.
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


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _expanded(cache: Any, rows: int, last: bool) -> Any:
    """The prefix cache repeated for ``rows`` continuations (a copy unless it is the last use)."""
    cache = cache if last else copy.deepcopy(cache)
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def score_group(model: torch.nn.Module, context: list[int], continuations: list[list[int]], batch_size: int,
                softmax_dtype: torch.dtype | None, device: torch.device) -> list[tuple[float, bool]] | None:
    """``(log-likelihood, is_greedy)`` of each continuation after ``context``: one pass of
    the context but its last token, then the continuations ``batch_size`` at a time over
    its cache. None when the model returns no cache (the caller takes the stock path)."""
    cache, params = None, _forward_parameters(type(model))
    cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed within transformers 5
    if len(context) > 1:
        # the prefix's own logits are never read: the head runs for its last position only
        keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        out = model(input_ids=torch.tensor([context[:-1]], dtype=torch.long, device=device), use_cache=True, **keep)
        cache = out.cache if "cache" in params else out.past_key_values
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
    answers = []
    chunks = list(_chunks(list(range(len(continuations))), batch_size))
    for n, chunk in enumerate(chunks):
        rows = [[context[-1], *continuations[i][:-1]] for i in chunk]
        width = max(len(r) for r in rows)
        # right padding, as lm-eval's: a causal model's real positions never see what follows them
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        past = None if cache is None else _expanded(cache, len(rows), n == len(chunks) - 1)
        logits = model(input_ids=ids, use_cache=past is not None, **{cache_kwarg: past}).logits
        for r, i in enumerate(chunk):
            target = torch.tensor(continuations[i], dtype=torch.long, device=device)
            logprobs = F.log_softmax(logits[r, :len(target)], dim=-1, dtype=softmax_dtype)
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            answers.append((float(logprobs.gather(1, target[:, None]).sum()), greedy))
    return answers


@functools.cache
def shared_prefix_class() -> type:
    """``SharedPrefixLM``: lm-eval's ``HFLM`` answering ``loglikelihood`` requests by
    shared prefixes (built on first use: lm-eval is an optional dependency)."""
    from lm_eval.models.huggingface import HFLM

    class SharedPrefixLM(HFLM):
        """``HFLM`` whose log-likelihood requests share each distinct context's forward pass."""

        def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            answers: list[tuple[float, bool] | None] = [None] * len(requests)
            stock: list[int] = []
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (_, context, continuation) in enumerate(requests):
                if len(context) + len(continuation) > self.max_length + 1 or not context or not continuation:
                    stock.append(i)
                else:
                    groups.setdefault(tuple(context), []).append(i)
            batch = self.batch_size if isinstance(self.batch_size, int) else (override_bs or 8)
            # the longest first, as lm-eval orders them: a batch that cannot fit fails at once
            for context in sorted(groups, key=lambda c: -len(c) - max(len(requests[i][2]) for i in groups[c])):
                members = groups[context]
                with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                     enabled=self.mixed_precision_dtype is not None):
                    scored = score_group(self.model, list(context), [requests[i][2] for i in members], batch,
                                         self.softmax_dtype, self.device)
                if scored is None:  # no key/value cache from this model: lm-eval's own path for all
                    stock += members
                    continue
                for i, answer in zip(members, scored):
                    answers[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            if stock:
                stock.sort()
                done = super()._loglikelihood_tokens([requests[i] for i in stock], disable_tqdm, override_bs)
                for i, answer in zip(stock, done):
                    answers[i] = answer
            return answers

    return SharedPrefixLM


__all__ = ["score_group", "shared_prefix_class"]
