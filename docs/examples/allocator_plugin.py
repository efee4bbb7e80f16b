"""An allocator plugin: ``ramp`` prunes deeper blocks harder, linearly.

Block b of B gets the target plus ``spread · (2b/(B−1) − 1)``, re-centred so that the
mean weighted by the layers' sizes is exactly the target. It reads no statistics, so it
needs no calibration data. Run it: ``python docs/examples/allocator_plugin.py``.
"""

from __future__ import annotations

from pydantic import Field

import stadebench


class Ramp(stadebench.Allocator):
    """Sparsity rising linearly with depth: target − spread in the first block, + spread in the last."""

    name = "ramp"
    version = "1"

    class Options(stadebench.Options):
        spread: float = Field(0.1, ge=0, lt=0.5)
        """How far the first and last blocks sit from the target."""

    def allocate(self, layers: list[stadebench.AllocationLayer], sparsity: float) -> list[float]:
        last = max(entry.layer.block for entry in layers)
        tilt = [self.options.spread * (2 * entry.layer.block / last - 1) if last else 0.0 for entry in layers]
        total = sum(entry.numel for entry in layers)
        centre = sum(t * entry.numel for t, entry in zip(tilt, layers)) / total
        values = [sparsity + t - centre for t in tilt]
        if min(values) < 0 or max(values) >= 1:
            raise stadebench.ConfigError(f"ramp: a spread of {self.options.spread:g} around {sparsity:g} leaves "
                                         f"[0, 1); lower the spread or the target")
        return values


@stadebench.hookimpl
def register_allocators(register):
    register(Ramp)


if __name__ == "__main__":
    import sys

    from stadebench.testing import make_tiny_model

    stadebench.get_plugins().register(sys.modules[__name__], name="ramp_example")

    model = make_tiny_model(layers=4)
    report = stadebench.prune(model, None, metric="magnitude", pattern="unstructured-layer", sparsity=0.5,
                              allocation="ramp", allocation_options={"spread": 0.2})
    by_block = {layer.block: layer.allocated for layer in report.layers}
    print({b: round(s, 3) for b, s in by_block.items()}, f"overall {report.sparsity:.4f}")
    assert [round(s, 6) for s in by_block.values()] == [0.3, 0.433333, 0.566667, 0.7]
    assert abs(report.sparsity - 0.5) < 1e-3
