# geowm — every target creates/refreshes the virtual environment itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.geowm-installed
DEMO   ?= demo
# torch: the CPU wheel on CPU machines (never an unpinned torch, which pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench bench-quick lint audit clean serve prefect-server

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	test -f $(DEMO)/synth/synth.json || $(VENV)/bin/geowm synth $(DEMO)/synth --size 512 --start 2021-01-01 --end 2022-12-31 --seed 7
	$(VENV)/bin/geowm ingest $(DEMO)/synth/stac/catalog.json --cube $(DEMO)/cube --catalog $(DEMO)/catalog
	$(VENV)/bin/geowm info $(DEMO)/cube
	test -f $(DEMO)/runs/tiny/eval.json || { rm -rf $(DEMO)/runs/tiny && $(VENV)/bin/geowm train --cube $(DEMO)/cube \
	  --out $(DEMO)/runs/tiny --preset tiny --steps 400 --train-until 2022-06-30 --landcover $(DEMO)/synth/landcover.tif; }
	$(VENV)/bin/geowm forecast --cube $(DEMO)/cube --model $(DEMO)/runs/tiny --out $(DEMO)/forecasts \
	  --init 2022-07-01 --leads 5,10,20,30 --members 4
	$(VENV)/bin/geowm anomalies --cube $(DEMO)/cube --forecasts $(DEMO)/forecasts --out $(DEMO)/alerts --history-days 365
	@echo "demo outputs in $(DEMO)/: synthetic scenes (synth/, ground truth synth/events.geojson), cube (cube/),"
	@echo "STAC catalog of scenes, cube, forecasts and alerts (catalog/catalog.json), trained tiny model with probes and held-out scores (runs/tiny/eval.json),"
	@echo "forecast store (forecasts/), alerts (alerts/alerts.geojson, alerts.parquet) and score raster (alerts/scores.zarr)."
	@echo "Python: import geowm; geowm.open_forecasts('$(DEMO)/forecasts'); geowm.open_alerts('$(DEMO)/alerts')"
	@echo "Dashboard: $(VENV)/bin/geowm dashboard --workdir $(DEMO)   (then open http://127.0.0.1:8501)"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check geowm catalog flows dashboard tests benchmarks

# Known vulnerabilities of the installed dependencies (pip-audit, PyPI's data); says so when it cannot reach
# the service (and does not fail then); AUDIT_FLAGS=--strict fails on a finding.
audit: $(STAMP)
	$(PY) -m benchmarks.audit --out benchmarks/results/pip-audit.txt $(AUDIT_FLAGS)

# The living demo (infra/README.md): a local Prefect server (SQLite in live/prefect), then `make serve`
# in a second terminal: the simulator releases 5 more days of a synthetic record each minute and the
# scheduled pipeline ingests, forecasts and raises alerts (`geowm dashboard --workdir live` shows them).
LIVE ?= live
prefect-server: $(STAMP)
	mkdir -p $(LIVE)/prefect
	PREFECT_HOME=$(CURDIR)/$(LIVE)/prefect $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

serve: $(STAMP)
	test -f $(LIVE)/watched.clock.json || $(VENV)/bin/geowm simulate $(LIVE)/watched --archive $(LIVE)/archive \
	  --size 256 --seed 7 --until 2021-06-30
	test -d $(LIVE)/cube || $(VENV)/bin/geowm ingest $(LIVE)/watched --cube $(LIVE)/cube
	test -f $(LIVE)/runs/tiny/eval.json || { rm -rf $(LIVE)/runs/tiny && $(VENV)/bin/geowm train --cube $(LIVE)/cube \
	  --out $(LIVE)/runs/tiny --preset tiny --steps 400 --train-until 2021-06-30; }
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(VENV)/bin/geowm serve --source $(LIVE)/watched \
	  --cube $(LIVE)/cube --model $(LIVE)/runs/tiny --forecasts $(LIVE)/forecasts --alerts $(LIVE)/alerts \
	  --simulate-archive $(LIVE)/archive --simulate-days 5 --interval 60

clean:
	rm -rf $(DEMO) $(LIVE) benchmarks/work .pytest_cache
