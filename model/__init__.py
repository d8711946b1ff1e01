"""GenCLIP engine: a library that scores batches of frames; knows nothing of cameras or brokers.

    from model import Engine, EngineConfig
    engine = Engine(EngineConfig(backbone="genclip-tiny"))
    predictions = engine.predict(frames, ["bottle", "pcb1"])
"""

from model.backbone import BackboneError, load_backbone
from model.checkpoint import CheckpointError
from model.cnf import CnfDecision
from model.config import EngineConfig
from model.engine import Engine, Prediction
from model.preprocess import InvalidFrameError
from model.regions import Defect

__all__ = [
    "BackboneError",
    "CheckpointError",
    "CnfDecision",
    "Defect",
    "Engine",
    "EngineConfig",
    "InvalidFrameError",
    "Prediction",
    "load_backbone",
]
