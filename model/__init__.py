"""GenCLIP engine: a library that scores batches of frames; knows nothing of cameras or brokers.

    from model import Engine, EngineConfig
    engine = Engine(EngineConfig(backbone="genclip-tiny", pretrained="random"))
    engine.classes.register("bottle", good_bottle_frames)   # class word (CNF) and threshold
    results = engine.predict(frames, ["bottle"] * len(frames))   # Prediction or FrameError per frame

Names are imported on first use, so `model.config` (read by `genclip config check`)
does not pull in torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BackboneError": "model.backbone",
    "load_backbone": "model.backbone",
    "CheckpointError": "model.checkpoint",
    "CnfDecision": "model.cnf",
    "EngineConfig": "model.config",
    "Engine": "model.engine",
    "Prediction": "model.outcomes",
    "FrameError": "model.outcomes",
    "ClassSetupError": "model.classes",
    "ClassStatus": "model.classes",
    "CalibrationSettings": "model.profile",
    "ClassProfile": "model.profile",
    "Calibration": "model.profile",
    "ProfileError": "model.profile",
    "InvalidFrameError": "model.preprocess",
    "Defect": "model.regions",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
