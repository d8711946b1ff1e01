"""GenCLIP engine: a library that scores batches of frames; knows nothing of cameras or brokers.

    from model import Engine, EngineConfig
    engine = Engine(EngineConfig(backbone="genclip-tiny"))
    predictions = engine.predict(frames, ["bottle", "pcb1"])

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
    "Prediction": "model.engine",
    "InvalidFrameError": "model.preprocess",
    "Defect": "model.regions",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
