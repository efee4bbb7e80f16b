"""The pruning core: model adapter, statistics, engine, built-in metrics and patterns.

It imports nothing of the bench, the data plumbing or the CLI: the engine takes metric
and pattern instances, and names are looked up only at the API and suite boundary.
"""
