"""Shared fixtures: the local data root, tiny models, the embedded default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before anything
# imports triton (tests/test_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantlab.models.tiny import TINY_MODELS, build_tiny_model


def pytest_addoption(parser):
    parser.addoption(
        "--seed",
        type=int,
        default=0,
        help="base seed of the tests that draw random inputs (default 0; printed in the header)",
    )


def pytest_configure(config):
    # the randomized tests (tests/test_kernels.py) read it from here
    os.environ["QUANTLAB_TEST_SEED"] = str(config.getoption("seed"))


def pytest_report_header(config):
    return f"random inputs: --seed {config.getoption('seed')} (replay a failure with the same)"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The local datasets folder (QUANTLAB_DATA). CI must have it; elsewhere tests skip."""
    value = os.environ.get("QUANTLAB_DATA")
    if not value:
        if os.environ.get("CI"):
            pytest.fail("CI must set QUANTLAB_DATA to the shared data folder")
        pytest.skip("QUANTLAB_DATA is not set")
    return Path(value)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Every tiny architecture, built once per session (seed 0)."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_model(name, root / name, seed=0) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model, converted once into the (per-run) cache."""
    from quantlab.models import resolve_model

    return resolve_model("smollm2-135m")
