"""The world model: a spatiotemporal JEPA over tubelet tokens with 3D rotary positions.

    from geowm.model import JEPA, ModelConfig
    model = JEPA(ModelConfig.preset("tiny", in_chans=4))
    out = model(batch)            # dict(loss, pred_loss, sigreg, n_context, n_target)
    out["loss"].backward(); opt.step(); model.update_target(step, total_steps)

``build_model(cfg)`` makes the model a config names (``cfg.kind``): the JEPA, or the pixel-space
generative baseline (:class:`geowm.model.pixel.PixelForecaster`) with the same encoder and predictor.
"""

from torch import nn

from geowm.model.config import ModelConfig
from geowm.model.jepa import JEPA, ema_momentum, rankme, sigreg_statistic
from geowm.model.pixel import PixelForecaster


def build_model(cfg: ModelConfig) -> nn.Module:
    """``JEPA(cfg)`` or, for ``cfg.kind == "pixel"``, ``PixelForecaster(cfg)``."""
    return PixelForecaster(cfg) if cfg.kind == "pixel" else JEPA(cfg)


__all__ = ["JEPA", "ModelConfig", "PixelForecaster", "build_model", "ema_momentum", "rankme", "sigreg_statistic"]
