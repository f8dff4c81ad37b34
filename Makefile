.PHONY: help bootstrap demo test lint clean

# Extra arguments for pytest, e.g. make test PYTEST_ARGS="-k nms -x"
PYTEST_ARGS ?=

help:
	@echo "make demo   - set up (scripts/bootstrap.sh), then train ViT³ and DeiT on Fashion-MNIST and write results/demo/report.md"
	@echo "make test   - set up and run the test suite (extra pytest args: PYTEST_ARGS=...)"
	@echo "make lint   - ruff (pyproject.toml [tool.ruff]: 120 columns)"
	@echo "make clean  - remove .venv and caches"

bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/vittt demo --output results/demo

test: bootstrap
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lint: bootstrap
	.venv/bin/ruff check src tests benchmarks

clean:
	rm -rf .venv .pytest_cache build dist
	find . -path ./.git -prune -o \( -name __pycache__ -o -name "*.egg-info" \) -type d -prune -exec rm -rf {} +
