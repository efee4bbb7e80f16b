"""Speed of a pruned model: dense against PyTorch's 2:4 semi-structured kernel, claiming
a speedup only where that kernel actually runs.

The one maintained 2:4 path is PyTorch core's ``torch.sparse.to_sparse_semi_structured``:
CUDA, compute capability 8.0 or newer, float16/bfloat16, every weight 2:4 along its input
dimension, shapes the kernel takes. Its gains depend on the shape (and it is slower than
dense at decode-sized inputs on some GPUs), so the evaluator measures on the model's own
layer shapes: the linear time of one block over a sweep of token counts, and the model's
prefill and decode latency, dense and with its linears converted, same inputs, warm-up
excluded, the median of several repetitions with their spread. Anywhere else (a CPU, an
unstructured pattern, float32) the scores are dense timings, ``details.kernel`` is
``dense`` with the reason, and no speedup is reported.
"""

from __future__ import annotations

import contextlib
import inspect
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..base import Evaluator, Options, Score
from ..core.models import check_context, find_blocks, iter_layers, weight_of
from ..hookspecs import hookimpl
from ..util import first_line
from .perplexity import placed

SEMI = "semi-structured"
DENSE = "dense"
HALF = (torch.float16, torch.bfloat16)


class SpeedOptions(Options):
    token_counts: list[Annotated[int, Field(ge=1, le=1 << 20)]] = Field(
        default_factory=lambda: [1, 16, 128, 1024, 4096], min_length=1)
    """Tokens (rows of the input) in the matmul sweep: 1 is a decode step, thousands a prefill."""
    prefill_tokens: int = Field(512, ge=1, le=1 << 20)
    """Prompt length of the end-to-end prefill."""
    decode_tokens: int = Field(32, ge=1, le=1 << 20)
    """Greedy steps of the end-to-end decode, with the KV cache of the prefill."""
    batch_size: int = Field(1, ge=1, le=4096)
    """Sequences per end-to-end forward pass."""
    repeats: int = Field(5, ge=1, le=1000)
    """Timed repetitions of every measurement; scores are their median."""
    warmup: int = Field(2, ge=0, le=1000)
    """Untimed repetitions before them (kernel selection, caches)."""


@dataclass(frozen=True)
class Kernel:
    """Which matmul kernel the pruned model can use here."""

    name: str
    """``semi-structured`` or ``dense``."""
    reason: str | None = None
    """Why it is dense (None for semi-structured)."""
    backend: str | None = None
    """The semi-structured tensor class (cuSPARSELt or CUTLASS)."""


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether an ``[out, in]`` weight has at least 2 exact zeros in every 4 consecutive inputs."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.reshape(rows, cols // 4, 4) == 0).sum(-1) >= 2).all())


def choose_kernel(model: nn.Module, device: torch.device) -> Kernel:
    """The kernel for ``model``'s prunable linears on ``device`` (where the weights are),
    trying the conversion of one weight of every shape before saying semi-structured."""
    if device.type != "cuda":
        why = "PyTorch has no CPU semi-structured kernel" if device.type == "cpu" else "it is CUDA-only"
        return Kernel(DENSE, f"no CUDA device ({device.type}): {why}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return Kernel(DENSE, f"compute capability {major}.{minor}: the semi-structured kernel needs 8.0 or newer")
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:
        return Kernel(DENSE, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
    layers = [(f"{i}.{short}", layer) for i, short, layer in iter_layers(model)]
    dtype = layers[0][1].weight.dtype
    if dtype not in HALF:
        return Kernel(DENSE, f"dtype {_dtype(dtype)} unsupported (float16 or bfloat16 only)")
    for name, layer in layers:
        if not isinstance(layer, nn.Linear):  # e.g. GPT-2's Conv1D
            return Kernel(DENSE, f"layer {name} is a {type(layer).__name__}, not an nn.Linear")
        if not is_2_4(layer.weight):
            return Kernel(DENSE, f"weights are not 2:4 (first: block {name})")
    backend = None
    for shape, (_, layer) in distinct_shapes(model).items():
        try:
            backend = type(to_sparse_semi_structured(layer.weight.detach())).__name__
        except Exception as exc:  # the kernel's shape and dtype rules change between releases
            return Kernel(DENSE, f"to_sparse_semi_structured failed on shape {list(shape)}: {first_line(str(exc))}")
    return Kernel(SEMI, None, backend)


def distinct_shapes(model: nn.Module) -> dict[tuple[int, int], tuple[int, nn.Module]]:
    """``(out, in)`` of the prunable linears -> (how many layers have it, the first of them)."""
    shapes: dict[tuple[int, int], tuple[int, nn.Module]] = {}
    for _, _, layer in iter_layers(model):
        shape = tuple(weight_of(layer).shape)
        count, first = shapes.get(shape, (0, layer))
        shapes[shape] = (count + 1, first)
    return shapes


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Milliseconds ``fn()`` takes on ``device`` (CUDA events there), and its result."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def repeat(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """``repeats`` timings of ``fn`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        timed(fn, device)
    return [timed(fn, device)[0] for _ in range(repeats)]


@contextlib.contextmanager
def semi_structured(model: nn.Module):
    """The model with every prunable linear's weight converted; the original parameters are put back."""
    from torch.sparse import to_sparse_semi_structured

    originals = [(layer, layer.weight) for _, _, layer in iter_layers(model)]
    try:
        for layer, weight in originals:
            layer.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
        yield model
    finally:
        for layer, weight in originals:
            layer.weight = weight


class Speed(Evaluator):
    """Dense vs 2:4 semi-structured matmul and end-to-end latency on the model's own shapes."""

    name = "speed"
    version = "1"
    Options = SpeedOptions

    def check_model(self, config: Any) -> None:
        """The prefill and decode tokens fit the model's context."""
        opts = self.options
        check_context(config, opts.prefill_tokens + opts.decode_tokens, "speed: prefill_tokens + decode_tokens")

    def evaluate(self, model: nn.Module, tokenizer: Any, device: torch.device | str | None = None
                 ) -> list[Score]:
        """Timings of ``model`` as it is; the model is left exactly as it was found."""
        self.check_model(getattr(model, "config", None))
        was_training = model.training
        model.eval()
        try:
            with placed(model, device) as dev, torch.no_grad():
                return self._measure(model, tokenizer, dev)
        finally:
            model.train(was_training)

    def _measure(self, model: nn.Module, tokenizer: Any, dev: torch.device) -> list[Score]:
        kernel = choose_kernel(model, dev)
        dtype = next(iter(iter_layers(model)))[2].weight.dtype
        common = {"kernel": kernel.name, "device": _device_name(dev), "dtype": _dtype(dtype),
                  "repeats": self.options.repeats, "warmup": self.options.warmup, "torch": torch.__version__,
                  "weights_2_4": all(is_2_4(weight_of(layer)) for _, _, layer in iter_layers(model))}
        shapes = distinct_shapes(model)
        dense = {s: (count, weight_of(layer).detach()) for s, (count, layer) in shapes.items()}
        dense_sweep, dense_e2e = self._sweep(model, dense, dev), self._end_to_end(model, tokenizer, dev)
        sparse_sweep = sparse_e2e = None
        if kernel.name == SEMI:
            from torch.sparse import to_sparse_semi_structured

            try:
                sparse = {s: (count, to_sparse_semi_structured(layer.weight.detach()))
                          for s, (count, layer) in shapes.items()}
                sparse_sweep = self._sweep(model, sparse, dev)
                with semi_structured(model):
                    sparse_e2e = self._end_to_end(model, tokenizer, dev)
            except Exception as exc:  # a kernel that converts but cannot run: measured dense, said why
                kernel = Kernel(DENSE, f"semi-structured matmul failed: {first_line(str(exc))}")
                sparse_sweep = sparse_e2e = None
        common["kernel"] = kernel.name
        if kernel.name == DENSE:
            common["reason"] = kernel.reason
        else:
            common["backend"] = kernel.backend
        return self._scores(common, dense_sweep, sparse_sweep, dense_e2e, sparse_e2e, model)

    def _sweep(self, model: nn.Module, weights: dict[tuple[int, int], tuple[int, torch.Tensor]],
               dev: torch.device) -> dict[int, list[float]]:
        """Per token count, the linear time of one block in each repetition: every distinct
        shape is timed once and counted for each layer that has it, over the blocks."""
        opts = self.options
        blocks = len(find_blocks(model)[1])
        gen = torch.Generator().manual_seed(0)  # the same inputs for dense and sparse weights
        out = {}
        for t in opts.token_counts:
            total = [0.0] * opts.repeats
            for (_, cols), (count, w) in weights.items():
                x = torch.randn(t, cols, generator=gen).to(dev, w.dtype)
                for r, ms in enumerate(repeat(lambda x=x, w=w: F.linear(x, w), dev, opts.warmup, opts.repeats)):
                    total[r] += ms * count / blocks
            out[t] = total
        return out

    def _end_to_end(self, model: nn.Module, tokenizer: Any, dev: torch.device) -> dict[str, list[float]]:
        """Prefill ms and decode ms per token of each repetition, from the same random prompt."""
        opts = self.options
        vocab = model.get_input_embeddings().weight.shape[0]
        if tokenizer is not None:
            vocab = min(vocab, len(tokenizer))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (opts.batch_size, opts.prefill_tokens), generator=gen).to(dev)
        params = inspect.signature(model.forward).parameters
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # as generate() does
        cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x

        def prefill():
            return model(input_ids=ids, use_cache=True, **extra)

        def decode(out):
            for _ in range(opts.decode_tokens):
                step = out.logits[:, -1:].argmax(-1)
                cache = out["cache"] if "cache" in out else out.get("past_key_values")
                out = model(input_ids=step, use_cache=True, **{cache_arg: cache})
            return out

        times = {"prefill": [], "decode": []}
        for r in range(opts.warmup + opts.repeats):
            p_ms, out = timed(prefill, dev)
            d_ms, _ = timed(lambda out=out: decode(out), dev)
            if r >= opts.warmup:
                times["prefill"].append(p_ms)
                times["decode"].append(d_ms / opts.decode_tokens)
        return times

    def _scores(self, common: dict, dense_sweep: dict, sparse_sweep: dict | None, dense: dict,
                sparse: dict | None, model: nn.Module) -> list[Score]:
        opts = self.options
        shapes = [[o, i, count] for (o, i), (count, _) in distinct_shapes(model).items()]
        matmul = {**common, "shapes": shapes, "blocks": len(find_blocks(model)[1])}
        e2e = {**common, "batch_size": opts.batch_size, "prefill_tokens": opts.prefill_tokens,
               "decode_tokens": opts.decode_tokens}
        scores = []

        def add(name, times, details, lower=True):
            scores.append(Score("speed", name, statistics.median(times), None, not lower,
                                {**details, "spread": [min(times), max(times)]}))

        def ratio(a, b):  # repetition by repetition: the spread shows how stable the gain is
            return [x / y for x, y in zip(a, b, strict=True)]

        for t, d in dense_sweep.items():
            add(f"dense_ms@t={t}", d, {**matmul, "tokens": t})
            if sparse_sweep is not None:
                add(f"sparse_ms@t={t}", sparse_sweep[t], {**matmul, "tokens": t})
                add(f"speedup@t={t}", ratio(d, sparse_sweep[t]), {**matmul, "tokens": t}, lower=False)
        tokens = {"prefill": opts.batch_size * opts.prefill_tokens, "decode": opts.batch_size}
        for label, times in (("dense", dense), ("sparse", sparse)):
            if times is None:
                continue
            for phase in ("prefill", "decode"):
                add(f"{label}_{phase}_ms", times[phase], e2e)
                add(f"{label}_{phase}_tok_s", [tokens[phase] * 1e3 / ms for ms in times[phase]], e2e, lower=False)
        if sparse is not None:
            for phase in ("prefill", "decode"):
                add(f"{phase}_speedup", ratio(dense[phase], sparse[phase]), e2e, lower=False)
        return scores


@hookimpl
def register_evaluators(register):
    register(Speed)


__all__ = ["DENSE", "HALF", "Kernel", "SEMI", "Speed", "SpeedOptions", "choose_kernel", "distinct_shapes", "is_2_4",
           "repeat", "semi_structured", "timed"]
