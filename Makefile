# Two entry points: `make demo` (set up + run the main job end to end) and `make test` (set up + tests).
# one variable per line: `export A=1 B=2` would export only A, with the value "1 B=2"
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export TOKENIZERS_PARALLELISM := false
MM = .venv/bin/mm
DEMO_SET ?= --set sweep.seeds=[0] --set train.epochs=12

.PHONY: setup demo test bench clean env
env:  # the environment every target runs with
	@env | grep -E '^(HF_HUB_OFFLINE|TRANSFORMERS_OFFLINE|DO_NOT_TRACK|PREFECT_SERVER_ANALYTICS_ENABLED|MLFLOW_DISABLE_TELEMETRY|DVC_NO_ANALYTICS|PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS|TOKENIZERS_PARALLELISM)=' | sort

setup:
	bash scripts/setup.sh

demo: setup
	$(MM) pipeline -c configs/avmnist.yaml $(DEMO_SET)
	$(MM) pipeline -c configs/fashion.yaml $(DEMO_SET)
	$(MM) store info -c configs/fashion.yaml
	$(MM) query -c configs/fashion.yaml --id 59263 --modality image -k 5
	$(MM) query -c configs/fashion.yaml --text "black leather shoes for men" -k 5 --split test
	$(MM) compare -c configs/avmnist.yaml

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/store_io.py
	.venv/bin/python bench/extraction.py
	.venv/bin/python bench/scaling.py
	.venv/bin/python bench/robustness.py --dataset avmnist --dataset fashion --seeds 0 1 2
