# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SYNTH_VENV ?= .venv-synth

.PHONY: install synth demo ulb prepare deploy test compose-e2e bench-deploy bench-quality bench-references bench-trees bench-privacy bench-robustness bench-score bench-serve clean

# torch first and pinned: 2.13.0 is the CPU wheel; anything looser pulls CUDA builds.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[simulation,dev]"
	touch $@

install: $(STAMP)

# `fedfraud-bank synthesize` in its own environment: SDV needs pandas < 3 (fedfraud's
# own uses pandas 3). torch first and pinned here too (SDV's CTGAN depends on torch).
$(SYNTH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SYNTH_VENV)
	$(SYNTH_VENV)/bin/python -m pip install -q --upgrade pip
	$(SYNTH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(SYNTH_VENV)/bin/python -m pip install -q -e ".[synth]"
	touch $@

synth: $(SYNTH_VENV)/.installed

prepare: install
	$(BIN)/fedfraud prepare

demo: install
	$(BIN)/fedfraud simulate

deploy: install
	$(BIN)/fedfraud --set num-server-rounds=3 deploy

# The ULB credit-card data (284,807 transactions, 492 frauds) in ten Dirichlet banks:
# the federation plus its centralized and local-only references. 20 rounds: on these
# 228k very unequal training rows AP still climbs after round 10 (0.796 -> 0.825 by
# round 14); the references get the same 20 x 3 epochs.
ulb: install
	$(BIN)/fedfraud fetch-ulb --out data/raw/creditcard.csv
	$(BIN)/fedfraud --set "data-source='data/raw/creditcard.csv'" \
		--set "data-dir='data/ulb'" --set num-server-rounds=20 simulate

bench-deploy: install
	$(BIN)/python bench/deploy.py --rounds 10

# Does federation pay, on the three kinds of data (issue 14's goals checked per seed):
# the tutorial's data (also against the tutorial's configuration), the synthetic card
# transactions, the tutorial's data in 100 banks, and ULB (20 rounds, as `make ulb`).
bench-quality: install
	$(BIN)/python bench/quality.py --seeds 1-3 --tutorial
	$(BIN)/python bench/quality.py --seeds 1-3 --data-source cards
	$(BIN)/python bench/quality.py --seeds 1-3 --banks 100
	test -e data/raw/creditcard.csv || $(BIN)/fedfraud fetch-ulb --out data/raw/creditcard.csv
	$(BIN)/python bench/quality.py --seeds 7 --data-source data/raw/creditcard.csv --rounds 20

# How far the centralized reference moves with its own starting point alone (100 banks,
# the seeds where the federation missed "centralized - 0.01").
bench-references: install
	$(BIN)/python bench/references.py --seeds 3,9 --banks 100

bench-trees: install
	$(BIN)/python bench/trees.py --seeds 1-3 --data-source cards
	$(BIN)/python bench/trees.py --seeds 1-3

bench-privacy: install
	$(BIN)/python bench/privacy.py --epsilons 0.5,1,3,8,0

bench-robustness: install
	$(BIN)/python bench/robustness.py --attacker 3

bench-serve: install
	test -e runs/latest/model.ts || $(BIN)/fedfraud simulate
	$(BIN)/python bench/serve.py

bench-score: install
	test -e runs/latest/model.ts || $(BIN)/fedfraud simulate
	$(BIN)/python bench/score.py

test: install synth
	$(BIN)/python -m pytest -q tests

# Builds and runs docker-compose.yml for real (needs root: installs and starts Docker).
compose-e2e:
	bash docker/e2e.sh

clean:
	rm -rf data runs .flwr
