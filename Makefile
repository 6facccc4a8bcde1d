# `make test` and `make demo` bootstrap .venv themselves (idempotent: re-installs only when pyproject.toml changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENV_GIB := 7
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast quality demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(PY) -c "import shutil; free = shutil.disk_usage('.').free / 2**30; \
	free < $(VENV_GIB) and print(f'WARNING: {free:.1f} GiB free here; the venv needs about $(VENV_GIB) GiB (torch with CUDA libraries). pip will fail with \"No space left on device\" if it runs out.')"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,video]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

quality: $(STAMP)
	$(BIN)/ruff check toolkit rewards modalities tests bench examples
	$(BIN)/ruff format --check toolkit rewards modalities tests bench examples
	$(BIN)/mypy toolkit rewards/base.py

demo: $(STAMP)
	$(BIN)/renorm train configs/text_agent/tiny.yaml trainer.run_dir=runs/demo

bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python bench/trainer_vs_trl.py

clean:
	rm -rf $(VENV) runs
