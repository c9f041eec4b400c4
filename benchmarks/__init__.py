"""asv benchmark suites for qlora_np (run: asv run --config benchmarks/asv.conf.json)."""
