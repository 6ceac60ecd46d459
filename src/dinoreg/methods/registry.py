"""Methods by name: a settings class (:class:`MethodSpec`) and a builder of its stages.

A method module registers itself with ``@method("name", SpecClass, "description")`` on a
function ``spec -> list[Stage]`` (see :mod:`dinoreg.pair` for the stage protocol). Every module
of the ``dinoreg.methods`` package is imported on the first look-up, so adding a method means
writing one module there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

from dinoreg.errors import DinoregError
from dinoreg.plugins import import_submodules
from dinoreg.features.base import EncoderSpec
from dinoreg.pair import Stage
from dinoreg.spec import Spec


@dataclass(frozen=True)
class MethodSpec(Spec):
    """Settings of a method. ``uses_features``: the stages need the pair's feature volumes (the
    pipeline encodes the pair first); ``needs_slice_encoder``: the stages load a 2D encoder
    themselves (an encoder in the loss)."""

    uses_features: ClassVar[bool] = True
    needs_slice_encoder: ClassVar[bool] = False

    def accepts_encoder(self, encoder: EncoderSpec) -> bool:
        """Whether the stages can use this encoder (kept when only the method changes)."""
        return True

    def check_encoders(self, encoders: Sequence[EncoderSpec]) -> None:
        """Reject encoders the stages cannot use (:class:`DinoregError`)."""
        if self.uses_features and not encoders:
            raise DinoregError(f"method {self.name} needs at least one encoder (setting 'features', e.g. mind)")

    def cell_sizes(self) -> tuple[int, ...]:
        """Cell sizes (voxels) the stages average features over (encoders may pool by their gcd)."""
        return (1,)

    def check_shape(self, shape: tuple[int, ...], name: str) -> None:
        """Reject an image too small for the stages (:class:`DinoregError` naming ``name``)."""


StageBuilder = Callable[..., list[Stage]]


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, settings class, one-line description and stage builder
    ``build(spec, encoders) -> list[Stage]`` (``encoders``: the registration's encoder specs)."""

    name: str
    spec: type[MethodSpec]
    description: str
    build: StageBuilder


_ENTRIES: dict[str, MethodEntry] = {}


def method(name: str, spec: type[MethodSpec], description: str) -> Callable[[StageBuilder], StageBuilder]:
    """Register ``build(spec, encoders) -> list[Stage]`` as the method ``name``."""

    def wrap(build: StageBuilder) -> StageBuilder:
        _ENTRIES[name] = MethodEntry(name, spec, description, build)
        return build

    return wrap


def _discover() -> None:
    import_submodules("dinoreg.methods")


def method_names() -> list[str]:
    """Registered method names."""
    _discover()
    return sorted(_ENTRIES)


def method_entry(name: str) -> MethodEntry:
    """The method called ``name``; a :class:`DinoregError` listing the registered ones otherwise."""
    _discover()
    if name not in _ENTRIES:
        raise DinoregError(f"unknown method {name!r}; choose from {', '.join(sorted(_ENTRIES))}")
    return _ENTRIES[name]
