"""Turn an attack spec string (from a CLI flag or a config file) into an attack object.

Spec syntax::

    NAME[,key=value...]                          a built-in attack, its defaults or parameters
    path/to/file.py:ClassName[,key=value...]     your own attack class, from a file
    package.module:ClassName[,key=value...]      your own attack class, from an importable module

Examples: ``sign_flip``, ``scaling,factor=10``, ``gaussian,sigma=0.5,directions=backward``,
``intermittent,p=0.25,inner=sign_flip``, ``intermittent,inner=scaling,inner.factor=10``,
``collusion,group_seed=7,stages=1-2,consecutive=true``, ``examples/my_attack.py:Freeze``.

- Names are case-insensitive; ``-`` and ``_`` are interchangeable (``sign-flip``).
- Values are parsed as bool (``true``/``false``/``yes``/``no``/``on``/``off``), int, float or str,
  never evaluated, then converted to the constructor's annotated type (a mismatch names the
  parameter; ``none`` gives ``None`` where allowed). ``prefix.key=value`` configures a nested
  attack named in parameter ``prefix``. Every built-in takes ``directions`` and ``start_step``.
- A plugin class needs no :class:`~sentinel.attacks.base.Attack` base: a no-argument constructor
  (spec parameters come as keywords) and any of ``forward(x, ctx)``, ``backward(g, ctx)``,
  ``average(params, ctx)``; it attacks the directions it defines unless told otherwise
  (:class:`PluginAttack`). A ``.py`` suffix or a path separator names a file; anything else
  before ``:`` is imported as a module.

Every problem raises :class:`AttackSpecError` with a message that says what to change.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

import torch

from sentinel.attacks.base import DIRECTIONS, Attack, AttackContext
from sentinel.attacks.catalogue import BUILTIN_ATTACKS

__all__ = ["AttackSpecError", "PluginAttack", "available_attacks", "default_directions", "load_attack"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class AttackSpecError(ValueError):
    """An attack spec that cannot be turned into an attack; the message says how to fix it."""


def available_attacks() -> dict[str, type[Attack]]:
    """Built-in attacks by name, in catalogue order."""
    return {cls.name: cls for cls in BUILTIN_ATTACKS}


def load_attack(spec: str, *, directions: str | None = None) -> Attack:
    """Build the attack described by ``spec`` (syntax in the module docstring).

    Args:
        spec: ``NAME[,key=value...]`` or ``path.py:Class[,...]`` or ``module:Class[,...]``.
        directions: if given, the directions to attack, overriding the attack's default. A spec
            that sets a different ``directions`` itself is an error. A plugin whose constructor
            has no ``directions`` parameter attacks the directions it is given, or
            by default those whose methods it defines (:class:`PluginAttack`).

    Raises:
        AttackSpecError: unknown name, unknown or badly typed parameter, missing file, module or
            class, or a class that is not attack-like.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise AttackSpecError(f"empty attack spec {spec!r}: give a name such as {_known_names()}")
    if directions is not None and directions not in DIRECTIONS:
        raise AttackSpecError(f"directions must be one of {', '.join(DIRECTIONS)}; got {directions!r}")
    head, *items = (part.strip() for part in spec.split(","))
    params = _parse_items(items, spec)

    if is_plugin_spec(head):
        cls, label = _resolve_plugin(head, spec)
    else:
        cls, label = _resolve_builtin(head, spec), f"attack {head!r}"

    signature = _signature(cls)
    takes_directions = signature is not None and "directions" in signature.parameters
    kwargs = _build_kwargs(cls, signature, params, label, spec)
    if directions is not None and takes_directions:
        if kwargs.get("directions", directions) != directions:
            raise AttackSpecError(
                f"{label}: spec {spec!r} sets directions={kwargs['directions']} but the caller asks for "
                f"directions={directions}; drop one of them"
            )
        kwargs["directions"] = directions

    try:
        attack = cls(**kwargs)
    except AttackSpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise AttackSpecError(f"{label}: {exc} (spec {spec!r})") from exc

    if not isinstance(attack, Attack):
        try:
            attack = PluginAttack(attack, directions)
        except ValueError as exc:
            raise AttackSpecError(f"{label}: {exc} (spec {spec!r})") from exc
    return attack


class PluginAttack:
    """A plain plugin class (not an :class:`~sentinel.attacks.base.Attack`) with the whole attack
    interface, so it runs wherever a built-in attack does: ``forward``, ``backward`` and ``average``
    (each the plugin's own where it defines one, honest otherwise), ``attacks``, ``reset``.

    ``directions`` defaults to the methods the plugin defines: a plugin with only ``backward``
    attacks backward, one with both attacks both. Before ``start_step`` (set by the launchers'
    ``--attack-start``) the plugin is not called at all.
    """

    def __init__(self, inner: Any, directions: str | None = None) -> None:
        defined = plugin_directions(inner)
        if directions is None:
            directions = defined
        if directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {', '.join(DIRECTIONS)}; got {directions!r}")
        self.inner = inner
        self.directions = directions
        self.name = getattr(inner, "name", type(inner).__name__)
        self.start_step = 0

    def attacks(self, direction: str) -> bool:
        """Whether this plugin corrupts messages going in ``direction``."""
        return self.directions in ("both", direction) and callable(getattr(self.inner, direction, None))

    def forward(self, x: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return self.inner.forward(x, ctx) if self.attacks("forward") and self._started(ctx) else x

    def backward(self, g: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return self.inner.backward(g, ctx) if self.attacks("backward") and self._started(ctx) else g

    def average(self, params: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        fn = getattr(self.inner, "average", None)
        return fn(params, ctx) if callable(fn) and self._started(ctx) else params

    def _started(self, ctx: AttackContext) -> bool:
        return ctx.step >= self.start_step

    def reset(self) -> None:
        fn = getattr(self.inner, "reset", None)
        if callable(fn):
            fn()

    def __repr__(self) -> str:
        return f"PluginAttack({self.inner!r}, directions={self.directions!r})"


def plugin_directions(obj: Any) -> str:
    """The directions a plugin's own methods attack: "both" unless it defines only one of
    ``forward`` and ``backward`` (an averaging-only plugin: "both", both honest)."""
    defined = [d for d in ("forward", "backward") if callable(getattr(obj, d, None))]
    return defined[0] if len(defined) == 1 else "both"


def is_plugin_spec(spec: str) -> bool:
    """Whether ``spec`` names a plugin class (``file.py:Class`` or ``module:Class``)."""
    return ":" in spec.split(",", 1)[0]


def default_directions(spec: str) -> str | None:
    """What a launcher attacks when the user names no direction: forward for a built-in attack
    (the demo's attack); ``None`` (the attack's own choice) for a plugin, which attacks the
    directions whose methods it defines, and for a spec that sets ``directions`` itself."""
    _, *items = (part.strip() for part in spec.split(","))
    if is_plugin_spec(spec) or any(key == "directions" for key, _ in _parse_items(items, spec)):
        return None
    return "forward"


# -- spec parsing --------------------------------------------------------------------------------


def _known_names() -> str:
    return ", ".join(available_attacks())


def _parse_items(items: list[str], spec: str) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise AttackSpecError(f"bad item {item!r} in attack spec {spec!r}: parameters are written key=value")
        if not all(part.isidentifier() for part in key.split(".")):
            raise AttackSpecError(f"bad parameter name {key!r} in attack spec {spec!r}")
        if key in seen:
            raise AttackSpecError(f"parameter {key!r} is given twice in attack spec {spec!r}")
        seen.add(key)
        params.append((key, value))
    return params


def _resolve_builtin(head: str, spec: str) -> type[Attack]:
    known = available_attacks()
    name = head.lower().replace("-", "_")
    if name in known:
        return known[name]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise AttackSpecError(
        f"unknown attack {head!r} in spec {spec!r}.{hint} Known attacks: {_known_names()}. "
        "For your own attack use path/to/file.py:ClassName or package.module:ClassName."
    )


def _resolve_plugin(head: str, spec: str) -> tuple[type, str]:
    target, _, class_name = head.rpartition(":")
    if not target or not class_name:
        raise AttackSpecError(f"bad plugin spec {spec!r}: write path/to/file.py:ClassName or package.module:ClassName")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file(target, spec)
    else:
        module = _import_module(target, spec)
    label = f"attack {head!r}"
    obj = getattr(module, class_name, None)
    if obj is None:
        candidates = [
            n for n, v in vars(module).items()
            if inspect.isclass(v) and _is_attack_like(v) and not n.startswith("_")
        ]
        found = f"attack-like classes there: {', '.join(candidates)}" if candidates else "it defines no attack-like class"
        raise AttackSpecError(f"{target!r} has no class {class_name!r} ({found}); spec {spec!r}")
    if not inspect.isclass(obj):
        raise AttackSpecError(f"{label}: {class_name!r} is a {type(obj).__name__}, not a class; spec {spec!r}")
    if not _is_attack_like(obj):
        raise AttackSpecError(
            f"{label}: class {class_name!r} is not an attack: it needs a callable forward(x, ctx), "
            "backward(g, ctx) or average(params, ctx) method (or subclass sentinel.attacks.Attack)"
        )
    return obj, label


def _is_attack_like(obj: Any) -> bool:
    return any(callable(getattr(obj, m, None)) for m in ("forward", "backward", "average"))


def _load_file(target: str, spec: str) -> types.ModuleType:
    path = Path(target).expanduser()
    if not path.is_file():
        raise AttackSpecError(f"attack file not found: {target!r} (looked at {path.resolve()}); spec {spec!r}")
    resolved = path.resolve()
    digest = hashlib.sha1(f"{resolved}:{resolved.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    module_name = f"_sentinel_attack_plugin_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise AttackSpecError(f"cannot load {target!r} as Python source; spec {spec!r}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise AttackSpecError(f"error while running attack file {target!r}: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(target: str, spec: str) -> types.ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise AttackSpecError(
                f"cannot import module {target!r} (no module named {exc.name!r}): is it installed or on "
                f"PYTHONPATH? For a file, give its path ending in .py; spec {spec!r}"
            ) from exc
        raise AttackSpecError(f"error while importing {target!r}: {exc}") from exc
    except Exception as exc:
        raise AttackSpecError(f"error while importing {target!r}: {type(exc).__name__}: {exc}") from exc


# -- parameters ----------------------------------------------------------------------------------


def _signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(cls)
    except (TypeError, ValueError):
        return None


def _build_kwargs(
    cls: type, signature: inspect.Signature | None, params: list[tuple[str, str]], label: str, spec: str
) -> dict[str, Any]:
    if not params:
        return {}
    named = {} if signature is None else {
        n: p for n, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    open_ended = signature is not None and any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}

    def check_known(key: str) -> None:
        if key not in named and not open_ended:
            accepted = ", ".join(named) or "none"
            raise AttackSpecError(f"{label}: unknown parameter {key!r}; accepted parameters: {accepted} (spec {spec!r})")

    kwargs: dict[str, Any] = {}
    nested: dict[str, list[tuple[str, str]]] = {}
    for key, raw in params:
        if "." in key:
            prefix, sub_key = key.split(".", 1)
            check_known(prefix)
            nested.setdefault(prefix, []).append((sub_key, raw))
            continue
        check_known(key)
        param = named.get(key)
        annotation = hints.get(key, param.annotation if param is not None else inspect.Parameter.empty)
        kwargs[key] = _coerce(raw, annotation, key, label, spec)

    for prefix, items in nested.items():
        param = named.get(prefix)
        base = kwargs.get(prefix, param.default if param is not None else None)
        if not isinstance(base, str):
            raise AttackSpecError(
                f"{label}: {prefix}.{items[0][0]} configures a nested attack, but parameter {prefix!r} "
                f"names none; set {prefix}=NAME too (spec {spec!r})"
            )
        sub_spec = ",".join([base, *(f"{k}={v}" for k, v in items)])
        try:
            kwargs[prefix] = load_attack(sub_spec)
        except AttackSpecError as exc:
            raise AttackSpecError(f"{label}, parameter {prefix!r}: {exc}") from exc
    return kwargs


def _coerce(raw: str, annotation: Any, key: str, label: str, spec: str) -> Any:
    allowed = _primitive_types(annotation)
    if allowed is None:
        return _guess(raw)
    if type(None) in allowed and raw.lower() == "none":
        return None
    lowered = raw.lower()
    if bool in allowed and (lowered in _TRUE or lowered in _FALSE):
        return lowered in _TRUE
    if int in allowed:
        try:
            return int(raw)
        except ValueError:
            pass
    if float in allowed:
        try:
            return float(raw)
        except ValueError:
            pass
    if str in allowed:
        return raw
    wanted = " or ".join(
        {bool: "true/false", int: "an integer", float: "a number", type(None): "none"}[t]
        for t in (bool, int, float, type(None)) if t in allowed
    )
    raise AttackSpecError(f"{label}: parameter {key!r} expects {wanted}, got {raw!r} (spec {spec!r})")


def _primitive_types(annotation: Any) -> set[type] | None:
    """The int/float/bool/str/None types an annotation allows, or None if it names none of them."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    allowed = {t for t in members if t in (bool, int, float, str, type(None))}
    if allowed == {type(None)} or not allowed:
        return None
    return allowed


def _guess(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw
