"""Where the configs shipped with meshplan live: package data under meshplan/configs/, found with importlib.resources.

`shipped("models")` is the directory of the shipped model configs, whether meshplan runs from a checkout or from
an installed wheel (the repository's top-level `configs` is a link to the same directory, for the paths docs and
benchmarks use).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(*parts: str) -> Path:
    """meshplan/configs/<parts...> inside the installed package."""
    return Path(str(resources.files("meshplan").joinpath("configs", *parts)))
