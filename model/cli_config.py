"""`key.sub=value` command lines over a dataclass schema (OmegaConf structured configs), shared by every CLI.

It lives here because `model` is the lowest package that both `train` and `eval` import, and eval must not
import train. Every problem becomes a `ConfigError` whose message starts with the key at fault, so each CLI
prints one `config error: <key>: ...` line instead of a traceback.
"""
from __future__ import annotations

import os
import typing
from dataclasses import fields, is_dataclass
from typing import Iterable, List, Literal, Optional, Sequence, Tuple

HELP_FLAGS = ("-h", "--help")

# Choices that the train and eval command lines share (as field types, so OmegaConf validates them).
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "bf16", "fp32"]  # auto: bf16 autocast on GPU, fp32 on CPU
WandbMode = Literal["disabled", "online", "offline"]


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key (or file) at fault."""


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines[:2]) if lines else type(e).__name__


def choices_of(annotation) -> Tuple[Optional[str], ...]:
    """The allowed values of a `Literal[...]` (or `Optional[Literal[...]]`) field type; () for any other type."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        allowed = tuple(c for arg in args for c in choices_of(arg))
        return allowed + (None,) if allowed and type(None) in args else allowed
    return ()


def check_choices(section, prefix: str) -> None:
    """ValueError `<prefix>.<key>: must be one of ...` for a Literal field holding another value.

    OmegaConf already rejects such values on the command line and in YAML; this covers configs built in code
    (tests, checkpoints' model_config dicts), so the choices are written once, in the field's type.
    """
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        allowed = choices_of(hints[f.name])
        value = getattr(section, f.name)
        if allowed and value not in allowed:
            key = f"{prefix}.{f.name}" if prefix else f.name
            raise ValueError(f"{key}: must be one of {', '.join(map(str, allowed))}, got {value!r}")


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


OMEGACONF_MIN = (2, 4)  # Literal field types (the choices above) need OmegaConf 2.4


def require_omegaconf() -> None:
    """ConfigError when the installed OmegaConf is too old for the schemas' Literal fields: 2.3 fails on the first
    such field with "Unexpected type annotation", which names neither the package nor the version to install."""
    import omegaconf

    version = getattr(omegaconf, "__version__", "0")
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:2])
    if parts < OMEGACONF_MIN:
        need = ".".join(map(str, OMEGACONF_MIN))
        raise ConfigError(f"config: mnemo needs omegaconf >= {need} (Literal field types); this environment has "
                          f"omegaconf {version}: pip install 'omegaconf>={need}'")


def load_structured(schema, path: Optional[str] = None, overrides: Iterable[str] = (),
                    example: str = "key.sub=value"):
    """Dataclass `schema` <- YAML file `path` (optional) <- `key=value` overrides -> a dataclass instance.

    Unknown keys and values of the wrong type raise ConfigError naming the key; validation of relations
    between values is the caller's (`validate()`).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    require_omegaconf()
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
        for layer in layers[1:]:
            located = _error_in_list_item(schema, OmegaConf.to_container(layer), "")
            if located:
                raise ConfigError(located) from None
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def _list_item_type(annotation):
    """The dataclass T of a `List[T]` / `Optional[List[T]]` field type, else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return _list_item_type(args[0])
    if typing.get_origin(annotation) is list and args and is_dataclass(args[0]):
        return args[0]
    return None


def _error_in_list_item(schema, values, path: str) -> Optional[str]:
    """`<path>.<list>[i].<key>: <problem>` for the first list item of `values` (one config layer as plain
    containers) that its dataclass rejects. OmegaConf checks a list's items before attaching them to the list,
    so its own error names only the item's key (`type`), not where the item is (`data.train[0].type`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(values, dict):
        return None
    hints = typing.get_type_hints(schema)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None:
            continue
        if is_dataclass(hint):
            located = _error_in_list_item(hint, value, f"{path}{name}.")
            if located:
                return located
        item_type = _list_item_type(hint)
        if item_type is None or not isinstance(value, list):
            continue
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            try:
                OmegaConf.merge(OmegaConf.structured(item_type), item)
            except OmegaConfBaseException as e:
                return f"{path}{name}[{i}].{e.full_key}: {str(e).splitlines()[0]}"
    return None


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
