# geowm — every target creates/refreshes the virtual environment itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.geowm-installed
DEMO   ?= demo
# torch: the CPU wheel on CPU machines (never an unpinned torch, which pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench bench-quick lint clean

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
	$(VENV)/bin/geowm anomalies --cube $(DEMO)/cube --forecasts $(DEMO)/forecasts --out $(DEMO)/alerts --history-days 120
	@echo "demo outputs in $(DEMO)/: synthetic scenes (synth/, ground truth synth/events.geojson), cube (cube/),"
	@echo "STAC catalog (catalog/catalog.json), trained tiny model with probes and held-out scores (runs/tiny/eval.json),"
	@echo "forecast store (forecasts/), alerts (alerts/alerts.geojson, alerts.parquet) and score raster (alerts/scores.zarr)."
	@echo "Python: import geowm; geowm.open_forecasts('$(DEMO)/forecasts'); geowm.open_alerts('$(DEMO)/alerts')"
	@echo "Dashboard: not built yet (issue 6)."

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check geowm catalog tests benchmarks

clean:
	rm -rf $(DEMO) benchmarks/work .pytest_cache
