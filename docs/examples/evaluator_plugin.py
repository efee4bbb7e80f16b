"""An evaluator plugin: the share of zero weights in the decoder blocks' linear layers.

A cheap sanity check to run next to perplexity: it measures the model as it is in
memory after pruning (an evaluator never saves and reloads it). Run it:
``python docs/examples/evaluator_plugin.py``.
"""

from __future__ import annotations

import stadebench
from stadebench.core.models import find_blocks, prunable_layers, weight_of


class ZeroFraction(stadebench.Evaluator):
    """Fraction of exactly-zero weights over all prunable linear layers."""

    name = "zero-fraction"
    version = "1"

    def evaluate(self, model, tokenizer, device=None) -> list[stadebench.Score]:
        zeros = total = 0
        for block in find_blocks(model)[1]:
            for _, layer in prunable_layers(block):
                w = weight_of(layer)
                zeros += int((w == 0).sum())
                total += w.numel()
        return [stadebench.Score(task="weights", name="zero_fraction", value=zeros / total,
                                 higher_is_better=False, details={"weights": total})]


@stadebench.hookimpl
def register_evaluators(register):
    register(ZeroFraction)


if __name__ == "__main__":
    import sys

    from stadebench.testing import make_tiny_model

    stadebench.get_plugins().register(sys.modules[__name__], name="zero_fraction_example")

    model = make_tiny_model()
    stadebench.prune(model, None, metric="magnitude", pattern="2:4")
    evaluator = stadebench.get_plugins().evaluators.get("zero-fraction").cls()
    (score,) = evaluator.evaluate(model, tokenizer=None)
    print(f"{score.task}/{score.name} = {score.value:.3f} over {score.details['weights']} weights")
    assert score.value == 0.5
