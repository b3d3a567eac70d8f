"""Typed YAML recipes: nested dataclasses filled from a YAML file, its ``base`` chain and ``key=value`` overrides.

Each trainer defines its recipe as nested dataclasses with defaults; :func:`load_recipe` turns a YAML file into
an instance of that schema and rejects anything the schema does not describe before training starts, so a
misspelled key or a wrongly typed value costs seconds instead of a wasted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml

from .atomic import write_atomically

T = TypeVar("T")

BASE_KEY = "base"
COMMAND_LINE = "command line"


class RecipeError(ValueError):
    """A recipe file or override does not match its schema; the message names the source and the dotted key."""


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A lower bound on a numeric recipe field, as ``Annotated[int, AtLeast(1)]``."""

    minimum: int | float


PositiveInt = Annotated[int, AtLeast(1)]
NonNegativeInt = Annotated[int, AtLeast(0)]


def load_recipe(path: str | Path, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Read the YAML recipe at ``path`` into an instance of the dataclass ``schema``.

    A top-level ``base: other.yaml`` key (relative to the file that names it) is loaded first and the file is
    deep-merged over it, recursively. ``overrides`` are ``dotted.key=value`` strings applied last, each value
    parsed with ``yaml.safe_load`` (``optim.lr=1e-3``, ``data.train_shards=[a,b]``). Unknown keys, wrongly typed
    values and missing required fields raise :class:`RecipeError` naming where the key came from.
    """
    if BASE_KEY in {field.name for field in dataclasses.fields(schema)}:
        raise TypeError(f"{schema.__name__} cannot have a field named '{BASE_KEY}': recipe files use it to inherit")
    path = Path(path)
    values, sources = _read_with_bases(path, chain=())
    for override in overrides:
        nested = _nest(*_parse_override(override))
        values = _merge(values, nested)
        sources.update(_key_sources(nested, COMMAND_LINE))
    return _build(schema, values, "", _Origin(sources, default=str(path), schema=schema))


def trainer_arguments(argv: Sequence[str] | None, description: str, exported: str,
                      default_export: str) -> argparse.Namespace:
    """The command line every trainer takes: a recipe, ``section.key=value`` overrides, and export-only options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.batch_size=128")
    parser.add_argument("--export-from", help=f"export the {exported} of this checkpoint and exit")
    parser.add_argument("--export-to", help=f"export folder (default: <output_dir>/{default_export})")
    return parser.parse_args(argv)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for command-line counts: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def run_tool(main: Callable[..., object], *args: object,
             errors: tuple[type[Exception], ...] = (FileNotFoundError, ValueError)) -> None:
    """Run a command line's ``main(*args)``: bad input (``errors``: by default a missing file or a wrong value) ends
    it with ``error: ...`` on stderr and status 1, as ``python -m pretrain.data`` does, instead of a traceback.
    Trainers pass ``errors=(RecipeError,)``: a recipe is checked before anything runs, and any later error keeps its
    traceback."""
    try:
        main(*args)
    except errors as exn:
        sys.exit(f"error: {exn}")


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """The recipe as plain YAML-safe data: nested dicts, lists, strings and numbers (paths become strings)."""
    if not dataclasses.is_dataclass(recipe) or isinstance(recipe, type):
        raise TypeError(f"expected a dataclass instance, got {type(recipe).__name__}")
    return _plain(dataclasses.asdict(recipe))


def save_recipe(recipe: Any, path: str | Path) -> None:
    """Write the resolved recipe to ``path`` atomically; :func:`load_recipe` reads it back to an equal recipe."""
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)
    write_atomically(Path(path), text.encode("utf-8"))


class _Origin:
    """Which file (or the command line) set each dotted key, and the whole schema, for error messages."""

    def __init__(self, sources: dict[str, str], default: str, schema: type):
        self.sources = sources
        self.default = default
        # Suggestions search the whole recipe, so a key put in the wrong section points to the right one.
        self.valid_keys = _dotted_keys(schema, "")

    def of(self, key: str) -> str:
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return self.default


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError(f"{path}: 'base' chain loops back on itself: {cycle}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"cannot read recipe {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: invalid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    sources = _key_sources(data, str(path))
    base = data.pop(BASE_KEY, None)
    sources.pop(BASE_KEY, None)
    if base is None:
        return data, sources
    if not isinstance(base, str):
        raise RecipeError(f"{path}: '{BASE_KEY}' must be a file path, got {type(base).__name__} {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise RecipeError(f"{path}: base recipe {base!r} not found (looked for {base_path})")
    base_values, base_sources = _read_with_bases(base_path, (*chain, resolved))
    return _merge(base_values, data), base_sources | sources


def _key_sources(data: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, str]:
    sources = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        sources[dotted] = source
        if isinstance(value, Mapping):
            sources.update(_key_sources(value, source, f"{dotted}."))
    return sources


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key, anything else (lists included) replaces."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(override: str) -> tuple[str, Any]:
    key, separator, text = override.partition("=")
    key = key.strip()
    if not separator or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"{COMMAND_LINE}: expected an override like 'section.key=value', got {override!r}")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{COMMAND_LINE}: cannot parse the value of '{key}': {error}") from None


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _build(schema: type, values: Any, key: str, origin: _Origin) -> Any:
    section = key or "the recipe"
    if not isinstance(values, Mapping):
        raise RecipeError(f"{origin.of(key)}: {section} must be a mapping of keys ({schema.__name__}), "
                          f"got {_describe(values)}")
    fields = {field.name: field for field in dataclasses.fields(schema) if field.init}
    hints = typing.get_type_hints(schema, include_extras=True)
    for name in values:
        if name not in fields:
            dotted = _join(key, str(name))
            close = difflib.get_close_matches(dotted, origin.valid_keys, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys here: {', '.join(fields)})"
            raise RecipeError(f"{origin.of(dotted)}: unknown key '{dotted}'{hint}")
    arguments = {}
    for name, field in fields.items():
        dotted = _join(key, name)
        if name in values:
            arguments[name] = _convert(values[name], hints[name], dotted, origin)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{origin.default}: missing required key '{dotted}' ({_type_name(hints[name])})")
    return schema(**arguments)


def _dotted_keys(schema: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(schema, include_extras=True)
    for field in dataclasses.fields(schema):
        if not field.init:
            continue
        dotted = prefix + field.name
        keys.append(dotted)
        for member in _union_members(hints[field.name]):
            if dataclasses.is_dataclass(member):
                keys.extend(_dotted_keys(member, f"{dotted}."))
    return keys


def _convert(value: Any, annotation: Any, key: str, origin: _Origin) -> Any:
    origin_type = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin_type in (typing.Union, types.UnionType):
        return _convert_union(value, arguments, annotation, key, origin)
    if origin_type is Annotated:
        converted = _convert(value, arguments[0], key, origin)
        for bound in arguments[1:]:
            if isinstance(bound, AtLeast) and converted < bound.minimum:
                raise RecipeError(f"{origin.of(key)}: '{key}' must be at least {bound.minimum}, got {converted!r}")
        return converted
    if origin_type is typing.Literal:
        if any(value == choice and type(value) is type(choice) for choice in arguments):
            return value
        if value is False and "no" in arguments:
            return "no"  # YAML 1.1 reads an unquoted no as false
        raise _type_error(key, f"one of {', '.join(repr(choice) for choice in arguments)}", value, origin)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key, origin)
    if annotation is float:
        return _to_float(value, key, origin)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, "int", value, origin)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, "bool (true or false)", value, origin)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, "str (quote the value if YAML reads it as something else)", value, origin)
    if annotation is Path:
        if isinstance(value, str):
            return Path(value)
        raise _type_error(key, "a path string", value, origin)
    if annotation in (list, tuple, dict) or origin_type in (list, tuple, dict, Sequence, Mapping):
        return _convert_container(value, origin_type or annotation, arguments, key, origin)
    raise TypeError(f"recipe field '{key}' has an unsupported type annotation {annotation!r}")


def _convert_union(value: Any, members: tuple, annotation: Any, key: str, origin: _Origin) -> Any:
    if value is None:
        if type(None) in members:
            return None
        raise _type_error(key, _type_name(annotation), value, origin)
    failures = []
    for member in members:
        if member is type(None):
            continue
        try:
            return _convert(value, member, key, origin)
        except RecipeError as error:
            failures.append(error)
    if len(failures) == 1:
        raise failures[0]
    raise _type_error(key, _type_name(annotation), value, origin)


def _convert_container(value: Any, container: Any, arguments: tuple, key: str, origin: _Origin) -> Any:
    if container in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _type_error(key, "a mapping", value, origin)
        item_type = arguments[1] if arguments else Any
        return {name: _convert(item, item_type, f"{key}.{name}", origin) for name, item in value.items()}
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, "a list", value, origin)
    if container is tuple and arguments and arguments[-1] is not Ellipsis:
        if len(value) != len(arguments):
            raise RecipeError(f"{origin.of(key)}: '{key}' expects a list of {len(arguments)} items, "
                              f"got {len(value)}: {value!r}")
        return tuple(_convert(item, item_type, f"{key}[{index}]", origin)
                     for index, (item, item_type) in enumerate(zip(value, arguments)))
    item_type = arguments[0] if arguments else Any
    items = [_convert(item, item_type, f"{key}[{index}]", origin) for index, item in enumerate(value)]
    return tuple(items) if container is tuple else items


def _to_float(value: Any, key: str, origin: _Origin) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        # PyYAML follows YAML 1.1, where a float needs a dot: `1e-3` arrives as the string "1e-3".
        try:
            return float(value)
        except ValueError:
            pass
    raise _type_error(key, "float", value, origin)


def _type_error(key: str, expected: str, value: Any, origin: _Origin) -> RecipeError:
    return RecipeError(f"{origin.of(key)}: '{key}' expects {expected}, got {_describe(value)}")


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        base, *bounds = typing.get_args(annotation)
        return " ".join([_type_name(base), *(f">= {bound.minimum}" for bound in bounds if isinstance(bound, AtLeast))])
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _union_members(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
