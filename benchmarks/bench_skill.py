"""Held-out skill: the JEPA against persistence, climatology, damped anomaly persistence, harmonic regression, a
BFAST-style model and a pixel-space generative model with the same encoder and training budget.

Set-up (``benchmarks._skill_setup``, shared with ``bench_efficiency``): a seeded synthetic region (full:
1024 x 1024 px, 2021-2022, every disturbance type forced plus harvest / mowing as normal change), ingested;
the JEPA (``tiny`` preset) and the pixel baseline (same preset and ``TrainConfig`` but ``model.kind``)
trained on the dates up to ``train_until``; the JEPA's probes fitted (``geowm.train.evaluate_run``).

Scored by ``geowm.evaluate.evaluate`` (the pixel baseline through ``others``) on the held-out period:

* NDVI forecast RMSE / MAE by lead on the same clear pixels for every method (inits every ``init_every``
  days; median of 1 member);
* anomaly AUROC at patch level against the ground-truth labels (``geowm.metrics.patch_labels``): the JEPA's
  surprise score vs each baseline's pixel score averaged per patch;
* alerts: the JEPA's confirmed alerts (``geowm.anomaly.detect``) and the harmonic (CCDC-style) and BFAST-style
  baselines' alerts (their change rule through the same confirmation and polygons), against the events:
  precision, recall, F1, false-alarm rate on normal change, median detection delay.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import _skill_setup as setup
from benchmarks.stages import _reset_peak_rss, _status_kib

METHODS = ("model", "pixel", "persistence", "climatology", "damped_anomaly", "harmonic", "bfast")
LABEL = {"model": "JEPA", "pixel": "pixel baseline", "damped_anomaly": "damped anomaly"}


def _num(v) -> str:
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}" if isinstance(
        v, float) else str(v)


def plot_rmse(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs = report["ndvi_forecast"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for m in METHODS:
        if m not in fs:
            continue
        leads = [float(k) for k, v in fs[m].items() if v["rmse"] is not None]
        rmse = [v["rmse"] for v in fs[m].values() if v["rmse"] is not None]
        ax.plot(leads, rmse, marker="o", lw=2.2 if m in ("model", "pixel") else 1.2, label=LABEL.get(m, m))
    ax.set_xlabel("lead (days)")
    ax.set_ylabel("NDVI RMSE (held-out clear pixels)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tables(report: dict, events: dict) -> list[str]:
    fs = report["ndvi_forecast"]
    leads = list(next(iter(fs.values())).keys())
    out = ["NDVI forecast error on held-out clear pixels (same pixels for every method), RMSE / MAE by lead:", "",
           "| method | " + " | ".join(f"{ld} d RMSE" for ld in leads) + " | " + " | ".join(
               f"{ld} d MAE" for ld in leads) + " |",
           "|---|" + "---:|" * (2 * len(leads))]
    for m in [m for m in METHODS if m in fs]:
        out.append(f"| {LABEL.get(m, m)} | " + " | ".join(_num(fs[m][ld]["rmse"]) for ld in leads) + " | "
                   + " | ".join(_num(fs[m][ld]["mae"]) for ld in leads) + " |")
    auc = report["anomaly_auroc"]
    rows = [("JEPA surprise", auc.get("model"), report["alerts"], report["n_alerts"])]
    for k in ("harmonic", "bfast"):
        b = (report.get("baseline_alerts") or {}).get(k, {})
        rows.append((f"{k} ({'CCDC' if k == 'harmonic' else 'BFAST'}-style)", auc.get(k), b, b.get("n_alerts")))
    for k in ("persistence", "climatology", "damped_anomaly"):
        rows.append((LABEL.get(k, k), auc.get(k), None, None))
    out += ["", "Anomalies on the held-out period: patch AUROC against ground truth; alerts against the events "
            "(false alarms: share of normal-change events, harvest / mowing, hit by an alert):", "",
            "| detector | AUROC | alerts | precision | recall | F1 | false-alarm rate (normal change) | "
            "median delay (d) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, a, al, n in rows:
        if al is None:
            out.append(f"| {name} | {_num(a)} | — | — | — | — | — | — |")
        else:
            fa = (al.get("false_alarms_normal_change") or {}).get("rate")
            out.append(f"| {name} | {_num(a)} | {n} | {_num(al.get('precision'))} | {_num(al.get('recall'))} | "
                       f"{_num(al.get('f1'))} | {_num(fa)} | {_num(al.get('median_detection_delay_days'))} |")
    out += ["", "Ground-truth events (all / starting in the held-out period): " + ", ".join(
        f"{k} {events['all'][k]} / {events['held_out'].get(k, 0)}" for k in sorted(events["all"]))]
    return out


def run(mode: str, workdir: Path) -> dict:
    from geowm.evaluate import evaluate
    from geowm.inference import WorldModel
    from geowm.synth.events import ANOMALY_TYPES

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = setup.prepare(mode, workdir)
    setup_s = time.perf_counter() - t0
    p = s["params"]
    events_path = str(Path(s["region"]) / "events.geojson")
    reset = _reset_peak_rss()  # the evaluation's own peak resident set, not the training's before it
    t = time.perf_counter()
    report = evaluate(s["cube"], WorldModel(s["runs"]["jepa"]), events_path, p["held_from"], leads=p["leads"],
                      init_every_days=p["init_every"], history_days=p["history_days"],
                      others={"pixel": s["runs"]["pixel"]})
    eval_s = time.perf_counter() - t
    peak = _status_kib("VmHWM:") if reset else None
    eval_peak_mib = round(peak / 1024, 1) if peak else None
    events = setup.events_summary(events_path, p["held_from"])
    (workdir / "evaluate.json").write_text(json.dumps(report, indent=1, default=str))
    png = workdir / "skill_rmse_by_lead.png"
    km = p["size"] * 10 / 1000
    plot_rmse(report, png, f"held-out NDVI RMSE, {p['size']} px synthetic region ({mode} mode), "
                           f"{p['steps']} training steps")

    fs = report["ndvi_forecast"]
    headline = {}
    for ld in ("10", "30"):
        for m in ("model", "pixel", "persistence", "climatology", "harmonic", "bfast"):
            v = fs.get(m, {}).get(ld, {}).get("rmse")
            if v is not None and np.isfinite(v) and v > 0:
                headline[f"{'jepa' if m == 'model' else m}_ndvi_rmse_{ld}d"] = round(v, 4)
    for m in ("model", "harmonic", "bfast"):
        v = report["anomaly_auroc"].get(m)
        if v is not None and np.isfinite(v) and v > 0:
            headline[f"{'jepa' if m == 'model' else m}_auroc"] = round(v, 3)
    missing = [k for k in ANOMALY_TYPES if events["held_out"].get(k, 0) == 0]
    headline["evaluate_peak_rss_MiB"] = eval_peak_mib
    notes = [f"Set-up (shared with `efficiency`): {json.dumps(s['setup_s'])} s; evaluation {eval_s:.0f} s, "
             f"peak resident set {eval_peak_mib} MiB (`/proc` VmHWM, reset before it).",
             f"Both models: `{p['preset']}` preset, {p['steps']} steps x batch {p['batch_size']}, trained on dates up "
             f"to {p['train_until']}; held-out period from {p['held_from']} (inits every {p['init_every']} d, "
             f"leads {list(p['leads'])} d; anomaly history {p['history_days']} d).",
             "Plot: `skill_rmse_by_lead.png`.",
             f"torch intra-op threads: {s.get('torch_threads')} in training (OMP_NUM_THREADS "
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')})."]
    if missing:
        notes.append(f"No event of type {', '.join(missing)} starts in the held-out period of this region "
                     "(they occur earlier in the record); anomaly scores cover the types that do.")
    desc = (f"Seeded synthetic region {p['size']} x {p['size']} px ({km * km:.0f} km^2), {p['start']}..{p['end']}, "
            f"seed {p['seed']}: the JEPA vs the pixel-space generative baseline (same encoder and training "
            "budget), persistence, climatology, harmonic (CCDC-style) and BFAST-style baselines, through "
            "`geowm.evaluate` on the held-out period.")
    return {"results": {"headline": headline, "description": desc, "notes": notes, "tables": tables(report, events),
                        "figures": [str(png)], "params": p, "events": events, "report": report,
                        "setup_s": s["setup_s"], "eval_s": round(eval_s, 1), "eval_peak_rss_MiB": eval_peak_mib,
                        "setup_wall_s": round(setup_s, 1)},
            "targets": {}}
