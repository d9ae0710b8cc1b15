# Two commands for a newcomer: `make demo` (the main job on the built-in offline stand-in) and `make test`.
# Both create .venv on first use and install the project into it; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.askexpert-installed

.PHONY: install demo test test-slow lint clean strategy-table ablations evidence evidence-beyond

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -qq -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole system on the stand-in: generalist, base, partition, experts, static experts, evaluation report.
demo: install
	$(PY) -m askexpert pipeline --config configs/pipeline/demo.yaml --out runs/demo

# Subset accuracy per specialization strategy, 3 seeds x 4 experts (docs/results/strategies_stand_in.md).
strategy-table: install
	$(PY) experiments/strategy_table.py --reuse

# The three shipped ablations on the stand-in, 3 seeds each, sharing one store (docs/results.md; about 65
# minutes on 2 CPU cores). Finished cells are skipped, so this also just rebuilds the tables.
ablations: install
	$(PY) -m askexpert ablate --config configs/ablations/strategies.yaml --out runs/ablations/strategies
	$(PY) -m askexpert ablate --config configs/ablations/partitions.yaml --out runs/ablations/partitions
	$(PY) -m askexpert ablate --config configs/ablations/experts_topk.yaml --out runs/ablations/experts_topk

# The method where the models learn: the stand-in at full size, 3 seeds x {superclass, confusion} x
# {progressive, static} (docs/results.md, "Evidence at CPU scale"; a few hours on 2 CPU cores, resumable:
# finished cells are skipped, an interrupted stage resumes). Then the analyses that explain the claims (from
# cached logits and the cost model, minutes) and the docs' generated blocks.
evidence: install
	$(PY) -m askexpert ablate --config configs/ablations/evidence.yaml --out runs/ablations/evidence
	$(PY) experiments/misrouting.py --ablation runs/ablations/evidence
	$(PY) experiments/routing_search.py --ablation runs/ablations/evidence
	$(PY) experiments/cost_projection.py --ablation runs/ablations/evidence
	$(PY) experiments/results_doc.py

# Beyond the paper, on the evidence runs (after `make evidence`; trains no stage, about 25 minutes on 2 CPU
# cores): the second expert re-evaluated from cached logits, and `adapt` with its controls (docs/results.md,
# "Beyond the paper"). Both resumable.
evidence-beyond: evidence
	$(PY) -m askexpert ablate --config configs/ablations/evidence_second_expert.yaml \
		--out runs/ablations/evidence_second_expert
	$(PY) experiments/second_expert.py --ablation runs/ablations/evidence_second_expert
	$(PY) experiments/adapt_evidence.py
	$(PY) experiments/results_doc.py

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf runs
