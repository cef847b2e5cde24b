"""Pretrained teachers from the libraries' own caches: teacher_checkpoint=torchvision:<Weights> (e.g.
torchvision:ResNet34_Weights.IMAGENET1K_V1, kept in the torch.hub cache) and timm:<name> (e.g. timm:resnet50.a1_in1k,
kept in the Hugging Face hub cache, or the torch.hub cache for weights timm fetches by URL).

The architecture still comes from model@teacher, which must be the weights' model. A file already in the cache is
used as it is, without network; an absent one is fetched by the library's own download, and when that fails
(offline) the run stops before any work with a message naming the file the library expects and where to put it. The
library reads its file weights-only (no pickled code runs); kd.checkpoints then matches the state_dict strictly
against model@teacher, as for any teacher file.
"""
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
import torchvision
from hydra.utils import get_method
from omegaconf import DictConfig
from torch import Tensor

from kd import records
from kd.models import close_names
from kd.models.torchvision_models import classification_models, torchvision_model

log = logging.getLogger(__name__)

LIBRARIES = ("torchvision", "timm")
TIMM_TARGET = "kd.models.timm_models.timm_model"  # a string: importing timm takes seconds, and only timm runs need it


class LibraryWeights(type(Path())):
    """The cached file a library's weights are read from, with the library (`torchvision`, `timm`) and the weights'
    name (`ResNet34_Weights.IMAGENET1K_V1`, `resnet50.a1_in1k`): a path like any teacher checkpoint's (its records
    cite this file and its sha256), which kd.checkpoints reads through the library."""

    library: str = ""
    weights: str = ""


class MissingWeights(FileNotFoundError):
    """The library's weights are not in its cache and could not be downloaded."""


def library_weights(path: Path | str, library: str, weights: str) -> LibraryWeights:
    """A LibraryWeights for the file at `path`."""
    located = LibraryWeights(path)
    located.library, located.weights = library, weights
    return located


def library_of(choice: str) -> Optional[str]:
    """The library a teacher_checkpoint value names ("torchvision:..." -> "torchvision"); None for auto, none, paths."""
    prefix, colon, _ = str(choice).partition(":")
    return prefix if colon and prefix in LIBRARIES else None


def locate(choice: str, model_cfg: DictConfig) -> LibraryWeights:
    """The cached file of teacher_checkpoint=<library>:<weights> for the teacher config, downloaded by the library
    when absent; refuses weights of another model and, offline, says where the file belongs."""
    library, _, name = str(choice).partition(":")
    if library == "torchvision":
        return _torchvision_file(name, model_cfg)
    return _timm_file(name, model_cfg)


def read(weights: LibraryWeights) -> tuple[dict[str, Tensor], Optional[float]]:
    """The state_dict the library makes of its cached file, and the top-1 accuracy the library records for it."""
    if weights.library == "torchvision":
        return _torchvision_state_dict(weights)
    return _timm_state_dict(weights), None


def _torch_hub_file(url: str, choice: str, library: str) -> Path:
    """The torch.hub cache file of `url` (where torch.hub.load_state_dict_from_url keeps it), downloaded if absent."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    log.info("teacher_checkpoint=%s: downloading %s into %s", choice, url, path.parent)
    try:
        # The libraries' own download (both load their URLs through it): hash-checked, written atomically.
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, weights_only=True, map_location="cpu")
    except OSError as error:  # no network (URLError), a refused or failed request, an unwritable cache
        raise MissingWeights(
            f"teacher_checkpoint={choice}: the weights are not in {library}'s cache and could not be downloaded "
            f"({error}). {library} reads them from {path}. On a machine with network, download {url} (e.g. `curl -L "
            f"-o {path.name} {url}`) and put the file at {path}, or set TORCH_HOME to a folder whose hub/checkpoints/ "
            f"holds it (torch.hub.get_dir() is {torch.hub.get_dir()} here)."
        ) from None
    return path


# ---------------------------------------------------------------------------------------------------------------
# torchvision


def torchvision_weights(name: str) -> torchvision.models.WeightsEnum:
    """torchvision's weights enum member for a name like ResNet34_Weights.IMAGENET1K_V1 (or .DEFAULT)."""
    try:
        return torchvision.models.get_weight(name)
    except (ValueError, KeyError):
        known = [str(w) for model in classification_models() for w in torchvision.models.get_model_weights(model)]
        raise ValueError(
            f"teacher_checkpoint=torchvision:{name}: torchvision has no such weights. Close names: "
            f"{close_names(name, known)}. A model's weights: torchvision.models.get_model_weights('resnet34')."
        ) from None


def _torchvision_file(name: str, model_cfg: DictConfig) -> LibraryWeights:
    weights = torchvision_weights(name)
    models = [m for m in classification_models() if torchvision.models.get_model_weights(m) is type(weights)]
    if get_method(model_cfg._target_) is not torchvision_model or model_cfg.get("name") not in models:
        raise ValueError(
            f"teacher_checkpoint=torchvision:{name} holds the weights of torchvision's {' / '.join(models)}, but "
            f"model@teacher is {records.model_name(model_cfg)}: set model@teacher=torchvision "
            f"teacher.name={models[0]}."
        )
    path = _torch_hub_file(weights.url, f"torchvision:{name}", "torchvision")
    return library_weights(path, "torchvision", str(weights))


def _torchvision_state_dict(located: LibraryWeights) -> tuple[dict[str, Tensor], Optional[float]]:
    weights = torchvision.models.get_weight(located.weights)
    # get_state_dict is torch.hub's load from the cache folder it is given (the file is there: no network).
    state = weights.get_state_dict(model_dir=str(located.parent), progress=False, check_hash=True,
                                   weights_only=True, map_location="cpu")
    accuracy = weights.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return {_current_key(key): value for key, value in state.items()}, accuracy


# DenseNet's published files still name each dense layer's modules "norm.1", "conv.2", ..., the names from before
# torchvision's "norm1", "conv2"; torchvision's densenet builder renames them on load, and so does this.
_DENSE_LAYER_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def _current_key(key: str) -> str:
    return _DENSE_LAYER_KEY.sub(r"\1\2.", key)


# ---------------------------------------------------------------------------------------------------------------
# timm


def _timm_file(name: str, model_cfg: DictConfig) -> LibraryWeights:
    pretrained = _timm_pretrained_cfg(name)
    full_name = f"{pretrained.architecture}.{pretrained.tag}" if pretrained.tag else pretrained.architecture
    import timm

    arch = timm.models.get_arch_name(model_cfg.get("name") or "")
    if model_cfg._target_ != TIMM_TARGET or arch != pretrained.architecture:
        raise ValueError(
            f"teacher_checkpoint=timm:{name} holds the weights of timm's {pretrained.architecture}, but model@teacher "
            f"is {records.model_name(model_cfg)}: set model@teacher=timm teacher.name={pretrained.architecture}."
        )
    if pretrained.hf_hub_id:
        path = _hub_file(pretrained.hf_hub_id, pretrained.hf_hub_filename, f"timm:{full_name}", full_name)
    elif pretrained.url:
        path = _torch_hub_file(pretrained.url, f"timm:{full_name}", "timm")
    else:
        raise ValueError(f"teacher_checkpoint=timm:{name}: timm names no file for {full_name}'s weights.")
    return library_weights(path, "timm", full_name)


def _timm_pretrained_cfg(name: str) -> Any:
    """timm's pretrained config for `name` (arch or arch.tag; a bare arch means timm's default tag)."""
    import timm

    arch = timm.models.get_arch_name(name)
    if not timm.is_model(arch):
        raise ValueError(f"teacher_checkpoint=timm:{name}: timm has no model {arch!r}. Close names: "
                         f"{close_names(arch, timm.list_models(pretrained=True))}.")
    try:
        pretrained = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        pretrained = None
    if pretrained is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise ValueError(f"teacher_checkpoint=timm:{name}: timm has no such pretrained weights. "
                         f"{arch}'s: {', '.join(tags) or 'none'}.")
    return pretrained


def _hub_file(hub_id: str, filename: Optional[str], choice: str, full_name: str) -> Path:
    """The Hugging Face cache file timm loads for a hub repo, downloaded by the hub if absent."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from timm.models._hub import _get_safe_alternatives

    repo, _, revision = hub_id.partition("@")
    filename = filename or "pytorch_model.bin"
    # timm's own order: a safetensors file first when the repo has one (timm is pinned; this helper is its own).
    candidates = [filename] if filename.endswith(".safetensors") else [*_get_safe_alternatives(filename), filename]
    for candidate in candidates:
        cached = try_to_load_from_cache(repo, candidate, revision=revision or None)
        if isinstance(cached, str):  # used as cached: no request, so an offline machine needs no HF_HUB_OFFLINE
            return Path(cached)
    problem = ""
    for candidate in candidates:
        try:
            return Path(hf_hub_download(repo, candidate, revision=revision or None))
        except LocalEntryNotFoundError:  # not cached, and no network (or HF_HUB_OFFLINE=1)
            problem = "the Hub could not be reached: no network, or HF_HUB_OFFLINE=1"
            break
        except EntryNotFoundError as error:  # the repo has no such file: timm tries the next
            problem = _first_line(error)
        except OSError as error:  # an HTTP error: gated, missing repo, no access
            problem = _first_line(error)
            break
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    raise MissingWeights(
        f"teacher_checkpoint={choice}: the weights are not in the Hugging Face cache and could not be downloaded "
        f"({problem}). timm reads them from the "
        f"hub repo {repo} (file {candidates[0]}), cached in {folder}. On a machine with network run `hf download "
        f"{repo} {candidates[0]}` (or `python -c \"import timm; timm.create_model('{full_name}', pretrained=True)\"`), "
        f"then copy its whole cache folder {folder.name} into {constants.HF_HUB_CACHE} here, or point HF_HUB_CACHE (or "
        "HF_HOME) at a cache that holds it. Set HF_HUB_OFFLINE=1 on machines without network, so the hub fails at "
        "once instead of retrying."
    ) from None


def _timm_state_dict(located: LibraryWeights) -> dict[str, Tensor]:
    import timm

    # timm builds the model and loads the file as its pretrained weights (weights-only, through its own key filters
    # for this model), the file overriding its download location.
    model = timm.create_model(located.weights, pretrained=True, pretrained_cfg_overlay={"file": str(located)})
    return model.state_dict()


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
