"""Shared test set-up: fake CPU devices, fixture paths."""

import os

# 8 fake CPU devices so that sharding tests can build real meshes; must be set before
# jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def official_ctclip_dir() -> pathlib.Path:
    """Tiny random-weight official CT-CLIP with its inputs and outputs (see its README)."""
    return FIXTURES / "official_ctclip_tiny"


@pytest.fixture(scope="session")
def tiny_synthetic_data(tmp_path_factory):
    """A small synthetic CT-RATE release, prepared at 8 x 16 x 16 with a tokenizer.

    Built once per test session through the same code the demo uses.
    """
    from experiments.synthetic_setup import SyntheticData, ensure_synthetic_data

    spec = SyntheticData(root=str(tmp_path_factory.mktemp("synthetic")), num_volumes=30,
                         seed=1, min_prevalence=0.3, target_spacing_mm=(45.0, 22.5, 22.5),
                         target_shape=(8, 16, 16), tokenizer_vocab_size=300)
    return ensure_synthetic_data(spec, log=lambda *a: None)
