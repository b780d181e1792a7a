"""`key.sub=value` command lines over a dataclass schema (OmegaConf structured configs), shared by every CLI.

It lives here because `model` is the lowest package that both `train` and `eval` import, and eval must not
import train. Every problem becomes a `ConfigError` whose message starts with the key at fault, so each CLI
prints one `config error: <key>: ...` line instead of a traceback.
"""
from __future__ import annotations

import os
from dataclasses import fields, is_dataclass
from typing import Iterable, List, Optional, Sequence

HELP_FLAGS = ("-h", "--help")


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key (or file) at fault."""


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines[:2]) if lines else type(e).__name__


def parse_override(item: str, example: str):
    """One `key=value` -> a DictConfig; a value that is not valid YAML names its key."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{item}: arguments are key=value (e.g. {example})")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        problem = _first_line(e)
        if getattr(e, "problem", None):  # yaml's own words without its "<unicode string>" positions
            mark = getattr(e, "problem_mark", None)
            problem = e.problem + (f" at character {mark.column + 1}" if mark is not None and mark.line == 0 else "")
        hint = ""
        if "{" in value:
            hint = " (in a {key: value} mapping put a space after each colon, e.g. \"data.train=[{paths: [x.jsonl]}]\")"
        raise ConfigError(f"{key}: cannot parse the value {value!r}: {problem}{hint}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: {_first_line(e)}") from None


def load_structured(schema, path: Optional[str] = None, overrides: Iterable[str] = (),
                    example: str = "key.sub=value"):
    """Dataclass `schema` <- YAML file `path` (optional) <- `key=value` overrides -> a dataclass instance.

    Unknown keys and values of the wrong type raise ConfigError naming the key; validation of relations
    between values is the caller's (`validate()`).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [OmegaConf.structured(schema)]
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config: file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # YAML syntax errors carry line numbers; keep them
            raise ConfigError(f"config: cannot parse {path}: {_first_line(e)}") from None
    layers += [parse_override(item, example) for item in overrides]
    try:
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def describe_keys(schema, prefix: str = "") -> List[str]:
    """`key = default` lines of a dataclass schema (nested sections flattened), for --help."""
    out = []
    obj = schema() if isinstance(schema, type) else schema
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out += describe_keys(value, f"{prefix}{f.name}.")
        else:
            out.append(f"  {prefix}{f.name}={value!r}" if isinstance(value, str) else f"  {prefix}{f.name}={value}")
    return out
