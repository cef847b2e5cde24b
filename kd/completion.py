"""Tab completion (`eval "$(python train.py -sc install=bash)"`): two things Hydra 1.3's completion leaves out, added
to its completion plugin when train.py starts.

- A group mounted at a package: `model@student=<TAB>` lists the model options (Hydra looks for a group named
  `model@student` and finds none), and `mod<TAB>` offers `model@teacher=` and `model@student=`, the mounts the
  root config's defaults list uses, instead of `model=`, which Hydra would refuse.
- Enum values: `precision=<TAB>` lists auto, fp32, bf16, fp16 (Hydra offers the current value alone).
"""
from enum import Enum
from typing import Any, Optional

from hydra.plugins.completion_plugin import CompletionPlugin
from hydra.types import RunMode
from omegaconf import OmegaConf

_HYDRA = {"query_config_groups": CompletionPlugin._query_config_groups, "get_matches": CompletionPlugin._get_matches}


def install() -> None:
    """Extend Hydra's completion plugin (every shell's); calling it again changes nothing."""
    CompletionPlugin._query_config_groups = query_config_groups
    CompletionPlugin._get_matches = staticmethod(get_matches)


def query_config_groups(
    plugin: CompletionPlugin, word: str, config_name: Optional[str], words: list[str]
) -> tuple[list[str], bool]:
    """Hydra's group completion, with `group@package` read as the group it mounts."""
    prefix = word[0] if word[:1] in ("+", "~") else ""
    key, equals, value = word[len(prefix):].partition("=")
    group, at, package = key.partition("@")
    if equals:  # model@student=res -> the options of model, under this key
        found, exact = _HYDRA["query_config_groups"](plugin, f"{prefix}{group}={value}", config_name, words)
        return [f"{prefix}{key}={match.split('=', 1)[1]}" for match in found], exact
    found, exact = _HYDRA["query_config_groups"](plugin, f"{prefix}{group}", config_name, words)
    mounts = _mounts(plugin, config_name, words)
    expanded = []
    for match in found:
        name = match[len(prefix):].rstrip("=")
        keys = mounts.get(name) if match.endswith("=") else None
        expanded += [f"{prefix}{k}=" for k in keys] if keys else [match]
    return [match for match in expanded if match.startswith(word)], exact


def _mounts(plugin: CompletionPlugin, config_name: Optional[str], words: list[str]) -> dict[str, list[str]]:
    """Group -> the keys that select its options in the defaults list (`model@teacher`, `model@student`; `optimizer`
    and `optimizer@teacher_recipe.optimizer`), for the groups that some entry mounts at another package."""
    try:
        defaults = plugin.config_loader.compute_defaults_list(config_name, words, RunMode.RUN).defaults
    except Exception:  # a line that does not compose (a typo before the cursor): Hydra's own offers only
        return {}
    mounts: dict[str, list[str]] = {}
    for default in defaults:
        if default.override_key:
            mounts.setdefault(default.override_key.partition("@")[0], []).append(default.override_key)
    return {group: keys for group, keys in mounts.items() if any("@" in key for key in keys)}


def get_matches(config: Any, word: str) -> list[str]:
    """Hydra's key and value completion, with every value of an Enum key (`precision=` -> precision=auto, ...)."""
    key, equals, value = word.partition("=")
    if equals and OmegaConf.is_config(config):
        current = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
        if isinstance(current, Enum):
            return [f"{key}={member.name}" for member in type(current) if member.name.startswith(value)]
    return _HYDRA["get_matches"](config, word)
