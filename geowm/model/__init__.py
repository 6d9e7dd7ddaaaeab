"""The world model: a spatiotemporal JEPA over tubelet tokens with 3D rotary positions.

    from geowm.model import JEPA, ModelConfig
    model = JEPA(ModelConfig.preset("tiny", in_chans=4))
    out = model(batch)            # dict(loss, pred_loss, sigreg, n_context, n_target)
    out["loss"].backward(); opt.step(); model.update_target(step, total_steps)
"""

from geowm.model.config import ModelConfig
from geowm.model.jepa import JEPA, ema_momentum, rankme, sigreg_statistic

__all__ = ["JEPA", "ModelConfig", "ema_momentum", "rankme", "sigreg_statistic"]
