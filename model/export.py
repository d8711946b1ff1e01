"""ONNX export of the image path for a fixed set of product classes, prompts folded in as constants.

The exported graph takes RGB images in [0, 1] already resized to the model's input
size, and a class index per image (into the class list given at export); it
returns the image scores and the anomaly maps at input size. Everything after
the pixels - CLIP, adapters, vision prompts, the text transformer for the
vision-enhanced prompts, fusion and blur - is inside the graph.

The model's metadata properties (`genclip.*`, strings; lists and tables as JSON) say what
whoever runs it must know: `onnx_metadata`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.engine import Engine, normalise_class_name


class ExportedScorer(nn.Module):
    """The engine's scoring for `classes`, as one traceable module on a CPU copy of the model."""

    suffixes: torch.Tensor  # buffers
    lengths: torch.Tensor
    query_text: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, engine: Engine, classes: list[str]) -> None:
        super().__init__()
        if not classes:
            raise ValueError("give at least one product class to export")
        names = [normalise_class_name(c) for c in classes]
        for name in names:
            if name not in engine.snapshot.classes:
                engine.classes.register(name)  # the plain name, as predict would use for an unfiltered class
        model, prompts = engine.cpu_copy()
        self.model = model
        self.settings = engine.settings
        entries = [engine.snapshot.classes[n] for n in names]
        padded, lengths = model.pad_suffixes([e.text.suffix for e in entries])
        self.register_buffer("suffixes", padded.detach().to("cpu").float().clone())
        self.register_buffer("lengths", lengths.detach().to("cpu").clone())
        self.register_buffer("query_text", prompts.query_text.clone())
        self.register_buffer("mean", torch.tensor(engine.backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(engine.backbone.std).view(1, 3, 1, 1))

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    def forward(self, images: torch.Tensor, class_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images - self.mean) / self.std
        out = self.model.score(
            x,
            self.query_text,
            self.suffixes[class_index],
            self.lengths[class_index],
            self.settings,
            truncate_text=False,
        )
        return out.scores, out.maps


METADATA_FORMAT = "genclip-onnx"
METADATA_VERSION = 1  # a new version when a key changes meaning or goes away; new keys keep it
INPUTS = {
    "images": "float32 [N, 3, S, S]: RGB in [0, 1], the frame resized to S = genclip.image_size as genclip.resize "
    "says (not normalised: the graph normalises with genclip.normalisation)",
    "class_index": "int64 [N]: each image's product class, its position in genclip.classes",
}
OUTPUTS = {
    "scores": "float32 [N]: image anomaly score in [0, 1]; NG when score >= the class's threshold (genclip.thresholds)",
    "anomaly_maps": "float32 [N, S, S]: per-pixel anomaly score in [0, 1] at input size S (resize it to the frame)",
}


def onnx_metadata(engine: Engine, classes: list[str]) -> dict[str, str]:
    """The metadata properties of the model exported for `classes` (set up on `engine`) from the engine's state."""
    names = [normalise_class_name(c) for c in classes]
    thresholds = {name: engine.classes.threshold(name) for name in names}
    backbone = engine.backbone
    return {
        "genclip.format": METADATA_FORMAT,
        "genclip.format_version": str(METADATA_VERSION),
        "genclip.classes": json.dumps(names),
        "genclip.thresholds": json.dumps({name: t.value for name, t in thresholds.items()}),
        "genclip.threshold_sources": json.dumps({name: t.source for name, t in thresholds.items()}),
        "genclip.class_words": json.dumps({name: engine.snapshot.classes[name].profile.class_word for name in names}),
        "genclip.image_size": str(engine.config.image_size),
        "genclip.resize": "the whole frame squashed to image_size x image_size (no crop, no padding), bilinear with "
        "antialiasing (PIL's Image.BILINEAR; torch interpolate bilinear antialias=True)",
        "genclip.normalisation": json.dumps({"mean": list(backbone.mean), "std": list(backbone.std), "in_graph": True}),
        "genclip.prompt_version": engine.prompt_version,
        "genclip.backbone": engine.config.backbone,
        "genclip.weights": backbone.weights,
        "genclip.inputs": json.dumps(INPUTS),
        "genclip.outputs": json.dumps(OUTPUTS),
        "genclip.decision": "is_anomalous = scores[i] >= thresholds[classes[class_index[i]]]",
    }


def export_onnx(engine: Engine, classes: list[str], path: Path, opset: int = 18) -> ExportedScorer:
    """Write the ONNX graph for `classes` to `path`, with `onnx_metadata`; returns the torch module it was made
    from."""
    scorer = ExportedScorer(engine, classes).eval()
    metadata = onnx_metadata(engine, classes)
    size = engine.config.image_size
    images = torch.rand(2, 3, size, size)
    index = torch.zeros(2, dtype=torch.long)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # class_index's batch axis is left to torch.export (AUTO): it finds it equal to the images' and names it
    # "batch" too. Naming both `batch` makes torch.onnx warn that one name "will not be used" (UserWarning).
    dynamic_shapes = {"images": {0: batch}, "class_index": {0: torch.export.Dim.AUTO}}
    weights_bytes = sum(p.numel() * p.element_size() for p in scorer.parameters())
    with torch.inference_mode(False), torch.no_grad():
        # One eager run first: what the scoring path caches (the map operator) is then built as real tensors and
        # folded into the graph as constants, the same graph whatever this process scored before.
        scorer(images, index)
        program = torch.onnx.export(
            scorer,
            (images, index),
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    program.model.metadata_props.update(metadata)
    program.save(str(path), external_data=weights_bytes > 1_500_000_000)  # protobuf's 2 GB limit
    return scorer


def check_onnx(scorer: ExportedScorer, path: Path, batch: int = 3, seed: int = 0) -> dict[str, float]:
    """Run the ONNX file with onnxruntime and the torch module on the same input; largest differences."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    size = scorer.image_size
    images = torch.rand(batch, 3, size, size, generator=generator)
    index = torch.randint(0, scorer.suffixes.shape[0], (batch,), generator=generator)
    with torch.no_grad():
        scores, maps = scorer(images, index)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_scores, onnx_maps = session.run(None, {"images": images.numpy(), "class_index": index.numpy()})
    return {
        "max_score_diff": float(np.abs(onnx_scores - scores.numpy()).max()),
        "max_map_diff": float(np.abs(onnx_maps - maps.numpy()).max()),
    }


def export_checked(
    engine: Engine, classes: list[str], path: Path, tolerance: float, opset: int = 18
) -> tuple[dict[str, float], bool]:
    """Export, check against torch, and only then put the file(s) at `path`; returns the differences and whether
    both are within `tolerance`.

    The graph is written into a temporary folder beside `path` and moved into place after the check passes, so a
    failed check, an error or Ctrl-C never leaves an unchecked model where a line would load it (nor replaces a good
    one). A weights file written beside a large graph (<name>.data) moves with it, before it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        scorer = export_onnx(engine, classes, staged, opset)
        diffs = check_onnx(scorer, staged)
        ok = all(math.isfinite(value) and value <= tolerance for value in diffs.values())
        if ok:
            for file in sorted(staging.iterdir(), key=lambda f: f.name == path.name):  # the graph last
                os.replace(file, path.parent / file.name)
        return diffs, ok
    finally:
        shutil.rmtree(staging, ignore_errors=True)
