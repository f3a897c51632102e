"""Programs built on the library: `launcher` (local clusters for `moe-serve up` and tests),
`demo`, `bench` (with `rpc_baseline`, the torch.distributed.rpc comparison) and `planner`
(`moe-serve placement`)."""
