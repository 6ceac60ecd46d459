"""``python -m dinoreg`` is the ``dinoreg`` command."""

from dinoreg.cli import run

run()
