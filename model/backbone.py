"""Loading the frozen CLIP: by open_clip name, with weights from a tag, a local file, or none.

A production line is usually offline, so weights are looked up on disk first
(an explicit file, or the Hugging Face / open_clip caches) and a missing file
fails at start in well under a second with a message saying how to provide
it, instead of open_clip's minute of hub retries. Random weights are seeded,
so the trainer and the agent build the very same random backbone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from model.digests import sha256_file

CONFIG_DIR = Path(__file__).parent / "model_configs"
RANDOM_INIT_SEED = 0


OpenClipModule = Any
"""An open_clip model, tower or block. open_clip ships no type information, and torch types what a module
reaches by attribute name (`visual.conv1`, `transformer.resblocks`, `attn.out_proj`) as `Tensor | Module`,
so the frozen CLIP's parts are reached untyped, at this one named boundary."""


class BackboneError(RuntimeError):
    """The backbone cannot be built as configured; the message says what to change."""


@dataclass(frozen=True)
class Backbone:
    """A frozen open_clip CLIP plus what the rest of the engine needs to know about it."""

    clip: OpenClipModule
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    name: str
    weights: str  # identity of the weights: "random-init:seed=0", "tag:openai", "sha256:<hex>"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    native_image_size: int
    depth: int
    vision_width: int
    text_width: int
    embed_dim: int


def register_configs(model_config: Path | None = None) -> None:
    """Make the project's own model configs (genclip-tiny), and a line's custom one, known to open_clip."""
    if "genclip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    if model_config is not None:
        try:
            open_clip.add_model_config(Path(os.path.expanduser(model_config)))
        except (OSError, ValueError) as exc:
            raise BackboneError(f"[model].model_config {model_config}: not a usable open_clip config ({exc})") from None


def _cached_tag_file(name: str, tag: str, cache_dir: Path | None) -> Path | None:
    """The weights file for an open_clip tag if it is already on disk; never touches the network."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else []
        names += [n for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if n not in names]
        for candidate in names:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=str(cache_dir) if cache_dir else None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    url = cfg.get("url", "")
    if url:
        for folder in (cache_dir, Path(os.path.expanduser("~/.cache/clip"))):
            if folder is not None and (Path(folder) / os.path.basename(url)).is_file():
                return Path(folder) / os.path.basename(url)
    return None


def _describe_tag(name: str, tag: str) -> str:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    return cfg.get("hf_hub") or cfg.get("url") or "(no download location known)"


def load_backbone(
    name: str,
    pretrained: str,
    *,
    allow_download: bool = False,
    cache_dir: Path | None = None,
    model_config: Path | None = None,
) -> Backbone:
    """Build the frozen CLIP `name` with weights from `pretrained` (tag, file, or 'random[:SEED]')."""
    register_configs(model_config)
    if not pretrained:
        raise BackboneError("[model].pretrained is empty: name the weights, or 'random' for seeded random weights")
    if name not in open_clip.list_models():
        raise BackboneError(
            f"unknown backbone '{name}': use an open_clip model name (e.g. ViT-L-14-336, ViT-B-16) or genclip-tiny"
        )
    kwargs: dict = {}
    weights_file: Path | None = None
    seed = RANDOM_INIT_SEED
    random_weights = pretrained == "random" or pretrained.startswith("random:")
    if random_weights:
        seed = int(pretrained.partition(":")[2] or RANDOM_INIT_SEED)
        weights = f"random-init:seed={seed}"
    elif Path(os.path.expanduser(pretrained)).is_file():
        weights_file = Path(os.path.expanduser(pretrained))
        weights = f"sha256:{sha256_file(weights_file)}"
    elif "/" in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
        raise BackboneError(f"weights file not found: {pretrained} (set [model].pretrained to an existing file)")
    else:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise BackboneError(f"'{pretrained}' is not a pretrained tag of {name} (known tags: {known})")
        weights = f"tag:{pretrained}"
        kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
        weights_file = _cached_tag_file(name, pretrained, cache_dir)
        if weights_file is None and not allow_download:
            where = cache_dir or os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
            raise BackboneError(
                f"pretrained weights '{pretrained}' for {name} are not on this machine "
                f"(looked for {_describe_tag(name, pretrained)} in the Hugging Face cache {where} "
                f"and in ~/.cache/clip). Provide them: put the weights file's path in [model].pretrained, "
                f"or copy the Hugging Face cache from a machine that has it (`hf download` there), "
                f"or set [model].allow_download = true on a machine with internet access."
            )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if weights_file is not None:
                clip = open_clip.create_model(name, pretrained=str(weights_file), **kwargs)
            elif random_weights:
                with _without_random_init_warning():
                    clip = open_clip.create_model(name, pretrained=None)
            else:
                clip = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # a foreign or corrupt weights file fails in many library-specific ways
        source = weights_file or pretrained
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:400]
        raise BackboneError(f"cannot load weights {source} into {name}: {detail}") from exc
    return _describe(clip, name, weights)


class _RandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip warns on the root logger that the model is random; we asked for that and say so ourselves."""
    quiet = _RandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _describe(clip: OpenClipModule, name: str, weights: str) -> Backbone:
    visual = clip.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise BackboneError(f"{name} has no ViT image tower; GenCLIP needs a ViT backbone (ViT-B-16, ViT-L-14-336...)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise BackboneError(f"{name} pools its image tokens differently from CLIP (class-token pooling needed)")
    text: OpenClipModule = getattr(clip, "text", clip)
    if not hasattr(text, "token_embedding"):
        raise BackboneError(f"{name} uses a Hugging Face text tower; GenCLIP needs CLIP's own text transformer")
    clip.eval()
    clip.requires_grad_(False)
    mean = tuple(float(v) for v in getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(float(v) for v in getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    patch = visual.conv1.kernel_size[0]
    grid = round((visual.positional_embedding.shape[0] - 1) ** 0.5)
    return Backbone(
        clip=clip,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        weights=weights,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        patch_size=patch,
        native_image_size=grid * patch,
        depth=len(visual.transformer.resblocks),
        vision_width=visual.conv1.out_channels,
        text_width=text.token_embedding.embedding_dim,
        embed_dim=visual.proj.shape[1] if visual.proj is not None else visual.conv1.out_channels,
    )
