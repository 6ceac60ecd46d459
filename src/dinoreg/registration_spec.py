"""The whole description of one registration: a frozen :class:`RegistrationSpec`.

A spec holds the method's settings (a :class:`~dinoreg.methods.registry.MethodSpec`), one
settings object per encoder (``--features a+b``), how an ensemble is combined, how the images
are preprocessed, and the seed. Presets (:mod:`dinoreg.presets`) are named instances.

**Flat settings.** Every entry point speaks ``key=value``: CLI options, ``--set key=value``,
``register(**overrides)``, dataset runs. :meth:`RegistrationSpec.with_flat` is the one strict
conversion:

* ``method=NAME`` switches to that method's default settings (a changed method never inherits
  the old one's learning rate);
* ``features=a+b`` picks the encoders (each keeps the spec's settings when it already had it,
  else its own defaults); when only the method changes, encoders it cannot use are dropped;
* every other key sets that field in **every** component that has it (``pca_components`` in
  each PCA-reduced encoder); a key that no component of this registration has is an error
  naming it and listing the settings that exist, and so is a value out of its range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from dinoreg.errors import DinoregError
from dinoreg.features.base import EncoderSpec
from dinoreg.features.ensemble import EnsembleSpec
from dinoreg.features.registry import encoder_entry
from dinoreg.methods.registry import MethodSpec, method_entry
from dinoreg.preprocess import PreprocessSpec
from dinoreg.spec import Spec, setting

@dataclass(frozen=True)
class RunSpec(Spec):
    """Settings of the run itself."""

    seed: int = setting(0, "seeds torch and numpy (randomised PCA, ...): same seed and device, same field",
                        low=0, high=2**32 - 1)


def parse_features(value: Any) -> tuple[str, ...]:
    """``"mind+dinov2"`` -> ``("mind", "dinov2")``; ``None``/``"none"``/``""`` -> ``()``."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value]
    else:
        text = str(value).strip()
        names = [] if text.lower() in ("", "none", "null") else [n.strip() for n in text.split("+")]
    if any(not n for n in names):
        raise DinoregError(f"setting 'features' must be encoder names joined by '+', got {value!r}")
    if len(set(names)) != len(names):
        raise DinoregError(f"setting 'features' names an encoder twice: {value!r}")
    for name in names:
        encoder_entry(name)
    return tuple(names)


@dataclass(frozen=True)
class RegistrationSpec:
    """One registration, fully resolved (see the module docstring)."""

    method: MethodSpec
    encoders: tuple[EncoderSpec, ...] = ()
    ensemble: EnsembleSpec = field(default_factory=EnsembleSpec)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    run: RunSpec = field(default_factory=RunSpec)

    def __post_init__(self) -> None:
        self.method.check_encoders(self.encoders)
        if len(self.encoders) > 1:
            self.ensemble.weights(len(self.encoders), self.features or "")
            self.ensemble.refinement_weights(len(self.encoders), self.features or "")
        elif self.ensemble.ensemble_weights is not None and len(self.ensemble.ensemble_weights) != len(self.encoders):
            raise DinoregError(f"setting 'ensemble_weights' needs {len(self.encoders)} value(s) for features "
                               f"{self.features!r}")

    @property
    def features(self) -> str | None:
        """The encoders as ``--features`` spells them (``a+b``), or None."""
        return "+".join(e.name for e in self.encoders) or None

    @property
    def seed(self) -> int:
        return self.run.seed

    def components(self) -> list[Spec]:
        """Every settings object, method first."""
        return [self.method, *self.encoders, self.ensemble, self.preprocess, self.run]

    def keys(self) -> list[str]:
        """Every flat key this registration accepts."""
        keys = {"method", "features"}
        for component in self.components():
            keys.update(component.keys())
        return sorted(keys)

    def to_flat(self) -> dict[str, Any]:
        """``key -> value`` for every setting (the first component holding a key wins)."""
        out: dict[str, Any] = {"method": self.method.name, "features": self.features}
        for component in self.components():
            for key, value in component.to_dict().items():
                if key != "name":
                    out.setdefault(key, value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The nested record written to ``Result.settings`` and ``metrics.json``."""
        return {"method": self.method.to_dict(), "encoders": [e.to_dict() for e in self.encoders],
                "ensemble": self.ensemble.to_dict(), "preprocess": self.preprocess.to_dict(),
                "seed": self.seed}

    def describe(self) -> str:
        """``convexadam on mind+dinov2``."""
        return f"{self.method.name} on {self.features or 'images'}"

    def with_flat(self, overrides: Mapping[str, Any]) -> RegistrationSpec:
        """A new spec with flat ``key=value`` settings applied (strict; see module docstring)."""
        values = dict(overrides)
        method = self.method
        if "method" in values:
            name = str(values.pop("method"))
            if name != method.name:
                method = method_entry(name).spec()
        encoders, ensemble = self.encoders, self.ensemble
        if "features" in values:
            current = {e.name: e for e in encoders}
            names = parse_features(values.pop("features"))
            encoders = tuple(current.get(n) or encoder_entry(n).spec() for n in names)
            if len(encoders) != len(self.encoders):  # the preset's per-encoder weights no longer fit
                ensemble = EnsembleSpec(ensemble=self.ensemble.ensemble)
        elif method is not self.method:
            encoders = tuple(e for e in encoders if method.accepts_encoder(e))
        components: list[Spec] = [method, *encoders, ensemble, self.preprocess, self.run]
        assigned: list[dict[str, Any]] = [{} for _ in components]
        unknown = []
        for key, value in values.items():
            owners = [i for i, c in enumerate(components) if key in c.keys()]
            if not owners:
                unknown.append(key)
            for i in owners:
                assigned[i][key] = value
        if unknown:
            keys = {"method", "features"}.union(*(c.keys() for c in components))
            features = "+".join(e.name for e in encoders) or "images"
            raise DinoregError(f"unknown setting {unknown[0]!r} for {method.name} on {features}; settings: "
                               f"{', '.join(sorted(keys))}")
        rebuilt = [c.replace(**a) if a else c for c, a in zip(components, assigned)]
        n = len(encoders)
        return RegistrationSpec(method=rebuilt[0], encoders=tuple(rebuilt[1:1 + n]),  # type: ignore[arg-type]
                                ensemble=rebuilt[1 + n], preprocess=rebuilt[2 + n], run=rebuilt[3 + n])  # type: ignore[arg-type]

