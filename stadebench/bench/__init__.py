"""The bench around the core: suite schema, plan, executors, result records and the leaderboard."""
