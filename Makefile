# The two set-up commands of the README: `make demo` (main job on built-in toy checkpoints) and `make test`.
.PHONY: setup demo test bench bench-monitor bench-detectors
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/openrlhf-bai demo
test: setup
	.venv/bin/python -m pytest -q tests
bench: setup
	.venv/bin/python benchmarks/bench_merge.py
bench-monitor: setup
	.venv/bin/python benchmarks/bench_monitor.py
bench-detectors: setup
	.venv/bin/python benchmarks/bench_detectors.py
