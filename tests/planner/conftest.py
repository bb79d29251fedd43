"""Shared, cached graphs for the planner tests (tracing the 352B config on the meta device takes ~1 s)."""
import dataclasses
import functools

import pytest

from meshplan.ir import trace
from meshplan.models import ModelConfig, build_model, load_config
from meshplan.planner import load_cluster


@functools.lru_cache(maxsize=None)
def _graph(name: str, overrides: tuple = ()):
    cfg = load_config(name)
    if overrides:
        cfg = dataclasses.replace(cfg, **dict(overrides))
    return trace(build_model(cfg, device="meta"))


@functools.lru_cache(maxsize=None)
def _custom(fields: tuple):
    return trace(build_model(ModelConfig(**dict(fields)), device="meta"))


@pytest.fixture(scope="session")
def graph():
    """graph("internal-352b", n_layers=2): a traced config, cached across tests."""
    return lambda name, **overrides: _graph(name, tuple(sorted(overrides.items())))


@pytest.fixture(scope="session")
def custom_graph():
    return lambda **fields: _custom(tuple(sorted(fields.items())))


@pytest.fixture(scope="session")
def h800():
    return load_cluster("h800")


@pytest.fixture(scope="session")
def h100():
    return load_cluster("h100")
