"""Request workloads the CLI and the benchmarks replay (Mooncake-format traces)."""
