"""Simulated Ray schedule of suites/llama.yaml on 1, 4 and 8 GPUs (the table in docs/ray.md).

    python tests/benchmarks/ray_schedule.py LEADERBOARD [--load SECONDS]

Per-cell costs come from LEADERBOARD: a finished run of suites/smollm2.yaml, whose rows
record each cell's prune and evaluation seconds. A llama.yaml cell costs the SmolLM2
cell of the same metric and pattern (unstructured-layer as unstructured, 4:8 as 2:4)
times the parameter ratio; a model load is ``--load`` (SmolLM2's) times the same ratio.
The schedule is ``stadebench.runner.scheduler.simulate``: the executor's own ``Scheduler``.
Absolute hours carry the reference machine's speed; speed-up and efficiency do not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stadebench.data.loading import ModelIdentity
from stadebench.results import store as lb
from stadebench.runner.plan import plan
from stadebench.runner.scheduler import simulate
from stadebench.suite import load_suite

SUITE = Path(__file__).parents[2] / "suites" / "llama.yaml"
PARAMS_B = {"meta-llama/Llama-2-7b-hf": 6.74, "meta-llama/Llama-2-13b-hf": 13.0, "meta-llama/Meta-Llama-3-8B": 8.03}
REFERENCE_B = 0.135  # SmolLM2-135M
NEAR = {"unstructured-layer": "unstructured", "4:8": "2:4"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("leaderboard", type=Path)
    parser.add_argument("--load", type=float, default=4.0, help="seconds to load the reference model")
    parser.add_argument("--actor-start", type=float, default=10.0, help="seconds before an actor takes work")
    args = parser.parse_args()
    suite = load_suite(SUITE)
    todo = plan(suite, {m: ModelIdentity("hub", None, None, None, None) for m in suite.models},
                fingerprints=lambda spec: "simulated")
    cost: dict[tuple, float] = {}
    for r in lb.current(lb.read(args.leaderboard)).to_pylist():
        key = (r["metric"], r["pattern"])
        cost.setdefault(key, r["prune_seconds"] or 0.0)
        cost[key] += r["eval_seconds"] or 0.0

    def cell_seconds(c) -> float:
        pattern = None if c.cell.dense else NEAR.get(c.cell.pattern, c.cell.pattern)
        return cost[c.cell.metric, pattern] * PARAMS_B[c.cell.model.id] / REFERENCE_B

    def load_seconds(m) -> float:
        return args.load * PARAMS_B[m.spec.id] / REFERENCE_B

    one = simulate(todo, 1, cell_seconds, load_seconds, args.actor_start)
    print(f"{len(todo.todo)} cells\n\n| GPUs | makespan | speed-up | efficiency | model loads |\n|---|---|---|---|---|")
    for slots in (1, 4, 8):
        r = simulate(todo, slots, cell_seconds, load_seconds, args.actor_start)
        print(f"| {slots} | {r['makespan'] / 3600:.1f} h | {one['makespan'] / r['makespan']:.2f}× | "
              f"{r['efficiency']:.0%} | {r['load_seconds'] / 60:.0f} min |")


if __name__ == "__main__":
    main()
