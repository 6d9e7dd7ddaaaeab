"""A trained run as one object: ``geowm.load_model(RUN)`` -> :class:`WorldModel` (encode, predict, decode).

Everything comes from the run directory (config, normalisation statistics, weights, probes), so
inference needs nothing else. Inputs and outputs are xarray objects with real coordinates:

* ``encode(ds)``: ``ds`` with ``reflectance`` (time, band, y, x) in physical units and ``valid``
  (time, y, x), e.g. ``geowm.open_cube(path).isel(...)``; returns latents (time, py, px, latent): one per
  token of ``t_frames`` acquisitions (1 for ``tiny``, 2 for ``small`` and ``base``; the oldest acquisitions
  that do not fill a token are left out), dated by its first acquisition.
* ``predict(ds, valid_times)``: forecast latents (time, py, px, latent) at the requested dates from
  the observations in ``ds`` (one direct prediction per date).
* ``decode(latents)``: the probes' reading of latents: ``reflectance`` (time, band, y, x) and
  ``ndvi`` (time, y, x) at pixel resolution.

Precision (``precision=``, ``--precision`` on the commands): the model's arithmetic in inference.

* ``fp32`` (the default): float32 with TF32 off; the same latents on every machine.
* ``bf16``: ``torch.autocast`` bfloat16 on the CPU or CUDA (matrix products and attention in bfloat16, norms
  and reductions in float32). Fast where the hardware has bfloat16 arithmetic (CUDA from Ampere on; CPUs with
  AVX512-BF16 or AMX); elsewhere it can be slower than fp32. Latents are returned as float32.
* ``tf32``: CUDA only; float32 with TF32 matrix products (for the whole process: a global torch setting).
* ``auto``: ``bf16`` where the device has bfloat16 arithmetic, else ``fp32``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from geowm.data import WindowConfig, day_of_year
from geowm.model import ModelConfig, build_model
from geowm.train import RunError, load_weights, pick_device

PRECISIONS = ("fp32", "bf16", "tf32", "auto")


def has_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bfloat16 arithmetic in hardware (CUDA: compute capability 8 or later; CPU: oneDNN's
    AVX512-BF16 / AMX check)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def check_precision(name: str) -> str:
    """``name`` if it is one of :data:`PRECISIONS`, else a :class:`RunError` naming them."""
    if name not in PRECISIONS:
        raise RunError(f"--precision {name!r}: one of {', '.join(PRECISIONS)}")
    return name


def pick_precision(name: str, device: torch.device) -> str:
    """``name`` (one of :data:`PRECISIONS`) resolved for ``device``: ``auto`` -> ``bf16`` or ``fp32``."""
    check_precision(name)
    if name == "tf32" and device.type != "cuda":
        raise RunError(f"--precision tf32: TF32 is a CUDA matrix format and the model runs on {device.type}; "
                       "use fp32 or bf16 there")
    if name == "auto":
        return "bf16" if has_bf16(device) else "fp32"
    return name


class WorldModel:
    """A trained JEPA with its run's normalisation and probes. Latents are layer-normed (the space the
    predictor forecasts in); ``latent`` has ``model.cfg.dim`` entries."""

    def __init__(self, run: str | Path, device: str = "auto", precision: str = "fp32"):
        self.run = Path(run)
        cfg_path = self.run / "config.json"
        if not cfg_path.exists():
            raise RunError(f"{self.run}: not a geowm run directory (no config.json)")
        self.config = json.loads(cfg_path.read_text())
        self.device = pick_device(device)
        self.precision = pick_precision(precision, self.device)  # fp32, bf16 or tf32 (see the module's docstring)
        if self.precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # the JEPA; or, for a pixel-baseline run (kind "pixel"), geowm.model.pixel.PixelForecaster, which
        # geowm.forecast forecasts with (encode / predict / decode below are the JEPA's)
        self.model = build_model(ModelConfig.from_dict(self.config["model"])).to(self.device)
        load_weights(self.run, self.model)
        self.model.eval()
        data = self.config["data"]
        self.bands: list[str] = data["bands"]
        self.common_names: list[str] | None = data.get("common_names")  # STAC common names (geowm.bands)
        self.mean = np.asarray(data["stats"]["mean"], np.float32)
        self.std = np.asarray(data["stats"]["std"], np.float32)
        self.probes, self.probe_meta = None, {}
        if (self.run / "probes.safetensors").exists():
            from geowm.probes import load_probes

            self.probes, self.probe_meta = load_probes(self.run)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def window(self) -> WindowConfig:
        """The training window geometry (size in px, frames, clear-sky rule): inference uses the same."""
        return WindowConfig(**self.config["train"]["window"])

    @property
    def run_id(self) -> str:
        """The run's name and the SHA-256 prefix of its weights: what forecasts record as their model."""
        meta = json.loads((self.run / "checkpoint.json").read_text()) if (self.run / "checkpoint.json").exists() else {}
        return f"{self.run.name}@{str(meta.get('model_sha256', 'unknown'))[:12]}"

    @property
    def config_hash(self) -> str:
        """SHA-256 (16 hex digits) of the run's model and training configuration."""
        text = json.dumps({"model": self.config["model"], "train": self.config["train"]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the model's calls run in: bfloat16 autocast for ``bf16``, nothing otherwise. Autocast holds
        per thread: enter it in the thread that calls the model (geowm's tile workers each do)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def normalise(self, refl: np.ndarray, valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical band values (..., T, C, h, w) and valid (..., T, h, w) -> model input (0 where invalid)
        and the validity with non-finite pixels removed, as float32 and bool tensors on the model's device.
        The values travel as they are and are normalised there: on a GPU that arithmetic, a fifth of an anomaly
        run's time when the CPU did it, leaves the CPU."""
        dev = self.device
        refl_t = torch.from_numpy(np.ascontiguousarray(refl, np.float32)).to(dev)
        valid_t = torch.from_numpy(np.ascontiguousarray(valid, bool)).to(dev) & torch.isfinite(refl_t).all(dim=-3)
        mean, std = (torch.from_numpy(a).to(dev)[:, None, None] for a in (self.mean, self.std))
        norm = torch.where(valid_t[..., None, :, :], (refl_t - mean) / std, torch.zeros((), device=dev))
        return norm, valid_t

    def decode_array(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Latents (N, latent) -> band values (N, C, p, p) in physical units and NDVI (N, p, p) (None
        without an NDVI probe), by the run's linear probes."""
        if self.probes is None:
            raise RunError(f"{self.run}: no probes (probes.safetensors); run `geowm train` to the end or "
                           "fit them with geowm.train.evaluate_run")
        p, C = self.cfg.patch, len(self.bands)
        z = z.reshape(-1, z.shape[-1]).astype(np.float32)
        w, b = self.probes["decoder_pixels_w"].numpy(), self.probes["decoder_pixels_b"].numpy()
        pix = (z @ w + b).reshape(-1, C, p, p) * self.std[None, :, None, None] + self.mean[None, :, None, None]
        ndvi = None
        if "decoder_ndvi_w" in self.probes:
            w, b = self.probes["decoder_ndvi_w"].numpy(), self.probes["decoder_ndvi_b"].numpy()
            ndvi = np.clip((z @ w + b).reshape(-1, p, p), -1, 1)
        return pix.astype(np.float32), None if ndvi is None else ndvi.astype(np.float32)

    def decode_change(self, z_pred: np.ndarray, z_last: np.ndarray,
                      anchor: str = "last") -> tuple[np.ndarray | None, np.ndarray | None] | None:
        """Forecast latents and the anchor latents of the same patches (both (N, latent)) -> the change of band
        values (N, C, p, p) in physical units and of NDVI (N, p, p) from the anchor's date to the forecast date,
        by the run's change decoder (see :mod:`geowm.probes`). ``anchor``: "last" (the patch's last observed
        latent) or "season" (its latent a year before the forecast date). None for a part the run has no change
        decoder for (it keeps one only where it beat the simpler forecast on held-out windows), None if neither."""
        pre = {"last": "change", "season": "season"}[anchor]
        if self.probes is None or not {f"{pre}_pixels_w", f"{pre}_ndvi_w"} & set(self.probes):
            return None
        p, C, D = self.cfg.patch, len(self.bands), z_pred.shape[-1]
        f = np.concatenate([z_pred.reshape(-1, D), z_last.reshape(-1, D)], -1).astype(np.float32)
        pix = ndvi = None
        if f"{pre}_pixels_w" in self.probes:
            w, b = self.probes[f"{pre}_pixels_w"].numpy(), self.probes[f"{pre}_pixels_b"].numpy()
            pix = ((f @ w + b).reshape(-1, C, p, p) * self.std[None, :, None, None]).astype(np.float32)
        if f"{pre}_ndvi_w" in self.probes:
            w, b = self.probes[f"{pre}_ndvi_w"].numpy(), self.probes[f"{pre}_ndvi_b"].numpy()
            ndvi = (f @ w + b).reshape(-1, p, p)
        return pix, None if ndvi is None else ndvi.astype(np.float32)

    def climatology_blend(self) -> dict[str, list[float]]:
        """The run's weights of its forecasts against the pixels' climatology, by variable ("pixels", "ndvi"),
        as fitted by :func:`geowm.calibrate.fit_calibration`; empty when the run has none."""
        from geowm.calibrate import CALIBRATION

        path = self.run / CALIBRATION
        if not path.exists():
            return {}
        return json.loads(path.read_text()).get("weights", {}) or {}

    def season_blend(self, key: str) -> np.ndarray | None:
        """Blend coefficients of the last-observation and year-ago forecasts of ``key`` ("pixels" or "ndvi"),
        for :func:`geowm.probes.blend`; None when the run has no year-ago decoder for it."""
        if self.probes is None or f"season_{key}_blend" not in self.probes:
            return None
        return self.probes[f"season_{key}_blend"].numpy()

    # ------------------------------------------------------------------------------ tensors
    def _batch(self, ds: xr.Dataset) -> tuple[dict[str, torch.Tensor], xr.Dataset, np.ndarray]:
        missing = [b for b in self.bands if b not in ds["band"].values]
        if missing:
            raise ValueError(f"input lacks band(s) {missing}; the model was trained on {self.bands}")
        p = self.cfg.patch
        ny, nx = ds.sizes["y"] // p * p, ds.sizes["x"] // p * p
        if ny == 0 or nx == 0:
            raise ValueError(f"input of {ds.sizes['y']} x {ds.sizes['x']} px is smaller than one {p} px patch")
        tf, T = self.cfg.t_frames, ds.sizes["time"]
        if T < tf:
            raise ValueError(f"input of {T} acquisition(s) is shorter than one token of {tf} acquisitions")
        # whole tokens of tf acquisitions: the oldest acquisitions that do not make one are left out
        ds = ds.isel(time=slice(T % tf, None), y=slice(0, ny), x=slice(0, nx)).sel(band=self.bands)
        norm, valid = self.normalise(ds["reflectance"].values, ds["valid"].values)  # (T, C, H, W)
        times = ds["time"].values.astype("datetime64[s]")
        days = ((times - times[0]).astype("timedelta64[s]").astype(np.float64) / 86400.0).astype(np.float32)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None].to(self.device)  # noqa: E731
        return {"pixels": norm[None], "valid": valid[None], "days": t(days), "doy": t(day_of_year(times))}, ds, times

    def _patch_coords(self, ds: xr.Dataset) -> dict[str, np.ndarray]:
        p = self.cfg.patch
        y, x = ds["y"].values, ds["x"].values
        return {"py": y.reshape(-1, p).mean(1), "px": x.reshape(-1, p).mean(1)}

    # ------------------------------------------------------------------------------ public
    @torch.no_grad()
    def encode(self, ds: xr.Dataset) -> xr.DataArray:
        """Observed latents (time, py, px, latent), NaN where a patch is mostly cloud or fill."""
        batch, ds, times = self._batch(ds)
        with self.autocast():
            lat, ok, _ = self.model.encode(batch["pixels"], batch["valid"], batch["days"], batch["doy"])
        lat = lat[0].float().cpu().numpy()
        lat[~ok[0].cpu().numpy()] = np.nan
        tf = self.cfg.t_frames
        coords = {"time": times[::tf][: lat.shape[0]], **self._patch_coords(ds)}
        return xr.DataArray(lat, dims=("time", "py", "px", "latent"), coords=coords, name="latent",
                            attrs={"run": str(self.run), "description": "observed latent (target encoder)"})

    @torch.no_grad()
    def predict(self, ds: xr.Dataset, valid_times: Sequence) -> xr.DataArray:
        """Forecast latents (time, py, px, latent) at ``valid_times`` from the observations in ``ds``."""
        batch, ds, times = self._batch(ds)
        vt = np.asarray(valid_times, dtype="datetime64[s]")
        days = ((vt - times[0]).astype("timedelta64[s]").astype(np.float64) / 86400.0).astype(np.float32)
        target_days = torch.from_numpy(days)[None].to(self.device)
        target_doy = torch.from_numpy(day_of_year(vt))[None].to(self.device)
        with self.autocast():
            pred = self.model.predict(batch, target_days, target_doy)[0].float().cpu().numpy()
        return xr.DataArray(pred, dims=("time", "py", "px", "latent"),
                            coords={"time": vt, **self._patch_coords(ds)}, name="latent",
                            attrs={"run": str(self.run), "description": "forecast latent (predictor)",
                                   "init_time": str(times[-1])})

    def decode(self, latents: xr.DataArray) -> xr.Dataset:
        """Band values (time, band, y, x) and NDVI (time, y, x) at pixel resolution, from the probes."""
        p, C = self.cfg.patch, len(self.bands)
        z = latents.transpose("time", "py", "px", "latent").values.astype(np.float32)
        T, Hp, Wp, _ = z.shape
        pix, nd = self.decode_array(z)
        pix = pix.reshape(T, Hp, Wp, C, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(T, C, Hp * p, Wp * p)
        offs = (np.arange(p) - (p - 1) / 2.0)
        py, px = latents["py"].values, latents["px"].values
        dy = (py[1] - py[0]) / p if len(py) > 1 else -1.0
        dx = (px[1] - px[0]) / p if len(px) > 1 else 1.0
        y = (py[:, None] + offs[None, :] * dy).ravel()
        x = (px[:, None] + offs[None, :] * dx).ravel()
        out = xr.Dataset({"reflectance": (("time", "band", "y", "x"), pix.astype(np.float32))},
                         coords={"time": latents["time"].values, "band": self.bands, "y": y, "x": x})
        if nd is not None:
            nd = nd.reshape(T, Hp, Wp, p, p).transpose(0, 1, 3, 2, 4).reshape(T, Hp * p, Wp * p)
            out["ndvi"] = (("time", "y", "x"), nd)
        return out


def load_model(run: str | Path, device: str = "auto", precision: str = "fp32") -> WorldModel:
    """Load a trained run directory: ``geowm.load_model("runs/tiny").encode(cube.isel(...))``. ``precision``:
    fp32 (default), bf16, tf32 (CUDA) or auto (see the module's docstring)."""
    return WorldModel(run, device, precision)
