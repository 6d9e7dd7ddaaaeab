"""Training efficiency: held-out forecast skill against training compute, the JEPA vs the pixel-space baseline.

The claim under test: joint-embedding prediction is 1.5x to 6x more training-efficient than generative
pixel prediction. Both models come from ``benchmarks._skill_setup`` (same region, preset, data, masks,
batch size and step budget; one training run each, snapshotted at several steps).

* Compute per step: ``torch.utils.flop_counter.FlopCounterMode`` over one training step (forward +
  backward; the JEPA's includes its EMA target encoder's forward), the mean over a few real batches with the
  training loop's masks; training FLOPs at a checkpoint = that x steps. Wall seconds: the training loop's
  own ``step_seconds`` summed up to the checkpoint (same machine, one after the other).
* Skill at a checkpoint: held-out NDVI forecast RMSE at leads >= 10 days (pooled over leads and inits) on
  a sub-region, every checkpoint of both models scored by ``geowm.evaluate.forecast_skill`` on the *same*
  pixels; the JEPA's checkpoints get their probes fitted first (``geowm.train.evaluate_run``; not counted as
  training compute: closed-form ridge fits).
* Ratio: each curve is made monotone (best RMSE so far); the level both reach is the worse of the two best
  RMSEs; the compute at which each first reaches it is interpolated (linear in log compute between
  checkpoints); ratio = pixel compute / JEPA compute (> 1: the JEPA needs less). When a model is already at
  that level at its first checkpoint, its compute there is an upper bound and the ratio is marked so.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks import _skill_setup as setup


def pooled_rmse(by_lead: dict, min_lead: float = 10.0) -> float | None:
    num = den = 0.0
    for ld, v in by_lead.items():
        if float(ld) >= min_lead and v["rmse"] is not None and v["n_pixels"]:
            num += v["rmse"] ** 2 * v["n_pixels"]
            den += v["n_pixels"]
    return float(np.sqrt(num / den)) if den else None


def reach(compute: list[float], rmse: list[float], level: float) -> tuple[float | None, bool]:
    """Compute at which the best-so-far RMSE first reaches ``level`` (log-linear interpolation between
    checkpoints); (None, False) if never; (first compute, True) if already reached at the first checkpoint."""
    c, best = np.asarray(compute, float), np.minimum.accumulate(np.asarray(rmse, float))
    hit = np.flatnonzero(best <= level + 1e-12)
    if len(hit) == 0:
        return None, False
    i = int(hit[0])
    if i == 0:
        return float(c[0]), True
    r0, r1 = best[i - 1], best[i]
    f = (r0 - level) / (r0 - r1) if r0 > r1 else 1.0
    return float(np.exp(np.log(c[i - 1]) + f * (np.log(c[i]) - np.log(c[i - 1])))), False


def ratio_at(curves: dict, key: str, level: float) -> dict:
    cj, bj = reach(curves["jepa"][key], curves["jepa"]["rmse"], level)
    cp, bp = reach(curves["pixel"][key], curves["pixel"]["rmse"], level)
    ratio = cp / cj if cj and cp else None
    bound = None  # the first checkpoint already at the level: its compute is an upper bound
    if ratio is not None and (bj or bp):
        bound = ("an upper bound (the pixel baseline was already there at its first checkpoint)" if bp and not bj
                 else "a lower bound (the JEPA was already there at its first checkpoint)" if bj and not bp
                 else "undetermined (both were already there at their first checkpoint)")
    return {"level_rmse": level, "jepa": cj, "pixel": cp, "ratio_pixel_over_jepa": ratio,
            "jepa_at_first_checkpoint": bj, "pixel_at_first_checkpoint": bp, "ratio_is": bound}


def plot(curves: dict, refs: dict, level: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, key, xlabel in ((axes[0], "flops", "training FLOPs (FlopCounterMode per step x steps)"),
                            (axes[1], "train_s", "training wall seconds")):
        for kind, style in (("jepa", "o-"), ("pixel", "s-")):
            c = curves[kind]
            ax.plot(c[key], c["rmse"], style, lw=2, label="JEPA" if kind == "jepa" else "pixel baseline")
            for x, y, st in zip(c[key], c["rmse"], c["steps"], strict=True):
                ax.annotate(str(st), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        for name, v in refs.items():
            if v is not None:
                ax.axhline(v, ls=":", lw=1, color="grey")
                ax.text(0.01, v, name, transform=ax.get_yaxis_transform(), fontsize=7, color="grey", va="bottom")
        if level is not None:
            ax.axhline(level, ls="--", lw=0.8, color="black", alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("held-out NDVI RMSE, leads >= 10 d", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(mode: str, workdir: Path) -> dict:
    from geowm.baselines import Climatology, Persistence, ndvi
    from geowm.evaluate import forecast_skill, held_out_inits
    from geowm.forecast import _as_dataset
    from geowm.inference import WorldModel
    from geowm.train import evaluate_run

    workdir.mkdir(parents=True, exist_ok=True)
    s = setup.prepare(mode, workdir)
    p = s["params"]
    t0 = time.perf_counter()
    fps = {kind: setup.flops_per_step(s["cube"], s["runs"][kind], p, kind, n_steps=4 if mode == "full" else 2)
           for kind in setup.KINDS}
    flops_s = time.perf_counter() - t0
    t = time.perf_counter()
    final = Path(s["runs"]["jepa"])
    for snap in s["snapshots"]["jepa"]:
        run = Path(snap["run"])
        if (run / "probes.safetensors").exists():
            continue
        if snap["step"] == p["steps"] and (final / "probes.safetensors").exists():  # same weights: same probes
            for name in ("probes.safetensors", "probes.json"):
                shutil.copyfile(final / name, run / name)
        else:
            evaluate_run(run, n_windows=p["probe_windows"])
    probes_s = time.perf_counter() - t

    t = time.perf_counter()
    ds, _ = _as_dataset(s["cube"])
    ds = ds.isel(y=slice(0, p["eff_px"]), x=slice(0, p["eff_px"]))
    nd = ndvi(ds).load()
    held = np.datetime64(p["held_from"], "s")
    history = nd.sel(time=slice(None, held.astype("datetime64[ns]") - np.timedelta64(1, "s")))
    fitted = {"persistence": Persistence().fit(history), "climatology": Climatology().fit(history)}
    inits = held_out_inits(ds["time"].values.astype("datetime64[s]"), held, p["eff_leads"], p["eff_init_every"])
    models = {f"{kind}@{snap['step']}": WorldModel(snap["run"]) for kind in setup.KINDS
              for snap in s["snapshots"][kind]}
    scores = forecast_skill(ds, nd, models, fitted, inits, p["eff_leads"])
    eval_s = time.perf_counter() - t

    curves = {}
    for kind in setup.KINDS:
        snaps = s["snapshots"][kind]
        curves[kind] = {"steps": [sn["step"] for sn in snaps],
                        "flops": [fps[kind] * sn["step"] for sn in snaps],
                        "train_s": [sn["train_s"] for sn in snaps],
                        "rmse": [pooled_rmse(scores[f"{kind}@{sn['step']}"]) for sn in snaps],
                        "train_loss_last20": [round(sn["loss_last20"], 5) for sn in snaps]}
    refs = {k: pooled_rmse(scores[k]) for k in fitted}
    ok = all(v is not None for c in curves.values() for v in c["rmse"])
    level = max(min(curves["jepa"]["rmse"]), min(curves["pixel"]["rmse"])) if ok else None
    ratios = {k: ratio_at(curves, k, level) for k in ("flops", "train_s")} if ok else {}
    png = workdir / "efficiency.png"
    plot(curves, refs, level, png, f"{p['size']} px region ({mode} mode), skill on {p['eff_px']} px, "
                                   f"{len(inits)} inits; both models {p['preset']}, batch {p['batch_size']}")

    headline = {"jepa_GFLOP_per_step": float(f"{fps['jepa'] / 1e9:.3g}"),
                "pixel_GFLOP_per_step": float(f"{fps['pixel'] / 1e9:.3g}"),
                "jepa_train_s": curves["jepa"]["train_s"][-1], "pixel_train_s": curves["pixel"]["train_s"][-1]}
    for kind in setup.KINDS:
        if curves[kind]["rmse"][-1] is not None:
            headline[f"{kind}_final_ndvi_rmse_ge10d"] = round(curves[kind]["rmse"][-1], 4)
    for key, name in (("flops", "flops"), ("train_s", "wall")):
        r = ratios.get(key, {}).get("ratio_pixel_over_jepa")
        if r is not None and r > 0:
            headline[f"compute_ratio_{name}_pixel_over_jepa"] = round(r, 3)
    lines = ["Held-out NDVI RMSE (leads >= 10 d) at each checkpoint, against training compute:", "",
             "| model | step | GFLOP (train) | wall s (train) | RMSE |", "|---|---:|---:|---:|---:|"]
    for kind in setup.KINDS:
        c = curves[kind]
        for st, f, w, r in zip(c["steps"], c["flops"], c["train_s"], c["rmse"], strict=True):
            lines.append(f"| {'JEPA' if kind == 'jepa' else 'pixel baseline'} | {st} | {f / 1e9:,.0f} | {w:,.1f} | "
                         f"{'—' if r is None else f'{r:.4f}'} |")
    for k, v in refs.items():
        lines.append(f"| {k} (no training) | — | — | — | {'—' if v is None else f'{v:.4f}'} |")
    notes = [f"FLOPs per step counted with FlopCounterMode in {flops_s:.0f} s; JEPA probes at each checkpoint "
             f"{probes_s:.0f} s; skill of {len(models)} checkpoints on {len(inits)} inits {eval_s:.0f} s.",
             "Plot: `efficiency.png` (RMSE against FLOPs and wall seconds, log x; dotted: persistence and "
             "climatology; dashed: the level both models reach).",
             f"torch intra-op threads: {s.get('torch_threads')} in training (OMP_NUM_THREADS "
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')})."]
    for key, name in (("flops", "FLOPs"), ("train_s", "wall seconds")):
        r = ratios.get(key)
        if r and r["ratio_pixel_over_jepa"] is not None:
            notes.append(f"Same skill (RMSE {r['level_rmse']:.4f}): the pixel baseline needs "
                         f"{r['ratio_pixel_over_jepa']:.2f}x the JEPA's training {name}"
                         + (f"; {r['ratio_is']}" if r["ratio_is"] else "") + ".")
        elif ok:
            notes.append(f"No {name} ratio: one model never reaches the other's best RMSE {level:.4f}.")
    beats = [k for k in setup.KINDS if curves[k]["rmse"][-1] is not None and refs.get("persistence") is not None
             and curves[k]["rmse"][-1] < refs["persistence"]]
    notes.append("Beat persistence at the last checkpoint: " + (", ".join(beats) if beats else "neither model") + ".")
    desc = (f"Skill against training compute for the JEPA and the pixel-space generative baseline (same encoder, "
            f"data, masks and budget: {p['steps']} steps x batch {p['batch_size']}, checkpoints at "
            f"{list(p['checkpoints'])}), on the `skill` benchmark's region; compute ratio at equal held-out skill.")
    return {"results": {"headline": headline, "description": desc, "notes": notes, "tables": lines,
                        "figures": [str(png)], "params": p, "flops_per_step": fps, "curves": curves,
                        "references": refs, "level_rmse": level, "ratios": ratios, "scores": scores,
                        "inits": [str(t) for t in inits]},
            "targets": {}}
