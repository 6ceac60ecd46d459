"""``dinoreg presets``: every named registration with what it uses; ``--keys`` lists every
setting (``--set KEY=VALUE``) with its allowed values and default, ``--encoders`` and
``--methods`` what is registered."""

from __future__ import annotations

import argparse

from dinoreg.cli import command


@command("presets", "list the named registrations (presets), their method and encoders, and every setting")
def _presets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one preset's full settings")
    p.add_argument("--keys", action="store_true", help="every setting of every method and encoder, with ranges")
    p.add_argument("--encoders", action="store_true", help="the registered encoders")
    p.add_argument("--methods", action="store_true", help="the registered methods")


@_presets_args.handler
def _presets(args: argparse.Namespace) -> int:
    from dinoreg.features.registry import encoder_entry, encoder_names
    from dinoreg.methods.registry import method_entry, method_names
    from dinoreg.presets import PRESETS, preset

    if args.name:
        chosen = preset(args.name)
        print(f"{chosen.name}: {chosen.description}")
        for key, value in chosen.spec.to_flat().items():
            print(f"  {key} = {value}")
        return 0
    if args.encoders:
        for name in encoder_names():
            entry = encoder_entry(name)
            print(f"{name:<12} {entry.kind:<6} {entry.description}")
        return 0
    if args.methods:
        for name in method_names():
            print(f"{name:<12} {method_entry(name).description}")
        return 0
    if args.keys:
        from dinoreg.features.ensemble import EnsembleSpec
        from dinoreg.preprocess import PreprocessSpec
        from dinoreg.registration_spec import RunSpec

        groups = [("method " + n, method_entry(n).spec) for n in method_names()]
        groups += [("encoder " + n, encoder_entry(n).spec) for n in encoder_names()]
        groups += [("ensemble", EnsembleSpec), ("preprocessing", PreprocessSpec), ("run", RunSpec)]
        print("method = convexadam | ffd;  features = encoder names joined by '+'")
        for title, spec in groups:
            print(f"\n[{title}]")
            for key, text in spec.help().items():
                print(f"  {key}: {text}")
        return 0
    for item in PRESETS.values():
        print(f"{item.name:<17} {item.spec.describe():<32} {item.description}")
    return 0
