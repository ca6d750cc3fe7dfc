"""The one registry of inverse-Hessian-vector-product solvers and their configuration objects.

Every way of choosing a solver reads it: names given to calculators (``ihvp_calculator="cgd"``), the
:class:`~deel.influenciae.common.IHVPCalculator` enum, the factories, the benchmark and its command line. A solver
registers itself once, next to its class::

    @dataclasses.dataclass(frozen=True)
    class MySolverConfig(SolverConfig):
        iterations: int = 10

    register_solver("mine", MySolver, MySolverConfig, description="...")

A configuration's fields are keyword arguments of the solver's constructor, which must accept
``(model, train_dataset=..., fit_now=..., **fields)``.
"""
import dataclasses
from typing import Any, Dict, Optional, Tuple, Type

import tensorflow as tf

from .ihvp_base import InverseHessianVectorProduct
from .model_wrappers import BaseInfluenceModel


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Settings of one solver (base class): ``regularization`` λ ≥ 0 (solve with ``H + λI``) and, in subclasses,
    every other keyword of the solver's constructor."""

    regularization: float = 0.0

    @property
    def name(self) -> str:
        """The registered name of the solver this configures."""
        return solver_entry(self).name

    def build(self, model: BaseInfluenceModel, train_set: tf.data.Dataset,
              fit_now: bool = True) -> InverseHessianVectorProduct:
        """The solver for ``model`` whose curvature is the mean over ``train_set`` (fitted unless ``fit_now`` is
        False)."""
        entry = solver_entry(self)
        return entry.solver_class(model, train_dataset=train_set, fit_now=fit_now, **self.fields())

    def fields(self) -> Dict[str, Any]:
        """The settings as keyword arguments (values as they are: models are not copied)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "SolverConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SolverEntry:
    """A registered solver: its name, other names accepted for it, its class, its configuration class and a
    one-line description."""

    name: str
    solver_class: Type[InverseHessianVectorProduct]
    config_class: Type[SolverConfig]
    aliases: Tuple[str, ...] = ()
    description: str = ""


_REGISTRY: Dict[str, SolverEntry] = {}


def register_solver(name: str, solver_class: Type[InverseHessianVectorProduct], config_class: Type[SolverConfig],
                    aliases: Tuple[str, ...] = (), description: str = "") -> SolverEntry:
    """Register a solver under ``name`` (and ``aliases``, all case-insensitive).

    Raises
    ------
    TypeError
        If the classes are not an :class:`InverseHessianVectorProduct` and a :class:`SolverConfig` dataclass.
    ValueError
        If a name is already taken by another solver.
    """
    if not (isinstance(solver_class, type) and issubclass(solver_class, InverseHessianVectorProduct)):
        raise TypeError(f"solver_class must be an InverseHessianVectorProduct subclass, got {solver_class!r}.")
    if not (isinstance(config_class, type) and issubclass(config_class, SolverConfig)
            and dataclasses.is_dataclass(config_class)):
        raise TypeError(f"config_class must be a SolverConfig dataclass, got {config_class!r}.")
    entry = SolverEntry(name.lower(), solver_class, config_class, tuple(alias.lower() for alias in aliases),
                        description)
    for key in (entry.name,) + entry.aliases:
        taken = _REGISTRY.get(key)
        if taken is not None and taken.solver_class is not solver_class:
            raise ValueError(f"The solver name {key!r} is already registered for {taken.solver_class.__name__}.")
    for key in (entry.name,) + entry.aliases:
        _REGISTRY[key] = entry
    return entry


def registered_solvers() -> Tuple[SolverEntry, ...]:
    """Every registered solver, once each, in registration order."""
    seen, entries = set(), []
    for entry in _REGISTRY.values():
        if entry.name not in seen:
            seen.add(entry.name)
            entries.append(entry)
    return tuple(entries)


def solver_names() -> Tuple[str, ...]:
    """The registered names (aliases excluded)."""
    return tuple(entry.name for entry in registered_solvers())


def solver_entry(spec: Any) -> SolverEntry:
    """The entry of a solver given by name (or alias), configuration (class or instance) or solver class.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    TypeError
        For anything else.
    """
    if isinstance(spec, str):
        entry = _REGISTRY.get(spec.lower())
        if entry is None:
            raise ValueError(f"ihvp_calculator must be one of {sorted(solver_names())}, got {spec!r}.")
        return entry
    for entry in registered_solvers():
        # The exact class: a configuration subclassing another solver's one belongs to its own solver.
        exact_config = type(spec) is entry.config_class  # pylint: disable=unidiomatic-typecheck
        if spec is entry.solver_class or spec is entry.config_class or exact_config:
            return entry
    raise TypeError(f"No registered solver for {spec!r}.")


def default_config(spec: Any, regularization: Optional[float] = None) -> SolverConfig:
    """The default configuration of a solver given by name or class, with ``regularization`` when given."""
    config = solver_entry(spec).config_class()
    return config if regularization is None else config.replace(regularization=float(regularization))


def build_solver(spec: Any, model: BaseInfluenceModel, train_set: Optional[tf.data.Dataset],
                 regularization: Optional[float] = None, fit_now: bool = True) -> InverseHessianVectorProduct:
    """A fitted solver from any way of naming one.

    Parameters
    ----------
    spec
        A registered name (``"exact"``, ``"cgd"``, ``"lissa"``, ``"arnoldi"``, ...), a :class:`SolverConfig`, a
        solver class (built with its defaults), an ``IHVPCalculator`` member, a factory (anything with
        ``build(model, train_set)``), or a solver instance (returned as it is).
    model, train_set
        The influence model and the dataset over which the curvature is the mean.
    regularization
        λ for solvers built from a name or a class (a configuration keeps its own).
    fit_now
        Fit the solver before returning it.
    """
    if isinstance(spec, InverseHessianVectorProduct):
        return spec
    value = getattr(spec, "value", None)  # an IHVPCalculator member holds the solver class
    if isinstance(value, type) and issubclass(value, InverseHessianVectorProduct):
        spec = value
    if isinstance(spec, SolverConfig):
        return spec.build(model, train_set, fit_now)
    if isinstance(spec, type) and issubclass(spec, InverseHessianVectorProduct) and \
            not any(entry.solver_class is spec for entry in registered_solvers()):
        # A user's own solver class that is not registered: its constructor's keywords are those of the built-ins.
        return spec(model, train_dataset=train_set, regularization=regularization or 0.0)
    if isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, InverseHessianVectorProduct)):
        return default_config(spec, regularization).build(model, train_set, fit_now)
    if callable(getattr(spec, "build", None)):
        return spec.build(model, train_set)
    raise TypeError(f"ihvp_calculator must be one of {sorted(solver_names())}, an IHVPCalculator member, a "
                    f"SolverConfig, an InverseHessianVectorProduct subclass or instance, or a factory; got {spec!r}.")
