"""Fixtures shared by the end-to-end command tests."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny CT-CLIP saved as a model directory (fits the
    tiny synthetic data: 8 x 16 x 16 volumes, vocabulary 300)."""
    from flax import nnx

    from ct_rate_jax import checkpoint_io
    from ct_rate_jax.models.ct_clip import CTCLIP, variant

    directory = tmp_path_factory.mktemp("tiny_model") / "model"
    checkpoint_io.save_converted(directory, CTCLIP(variant("tiny", vocab_size=320),
                                                   rngs=nnx.Rngs(0)))
    return directory
