"""Registers the top-level configurables with gin and parses config files and bindings.

Gin binds only top-level things (T5X style): the model config dataclasses, the
optimizer factory, the trainer function and the demo data.  Layers take plain
constructor arguments.
"""

from __future__ import annotations

import os
from typing import Sequence

import gin
from absl import flags, logging

from ct_rate_jax.models.bert import BertConfig
from ct_rate_jax.models.ct_clip import CTCLIPConfig
from ct_rate_jax.models.ctvit import CTViTConfig
from ct_rate_jax.training.optimizer import adamw_warmup_cosine
from experiments.synthetic_setup import SyntheticData

# The flags of every gin-configured entry point (pretrain, finetune_chat), defined once
# here so that both modules can be imported into one process (absl refuses a flag
# defined twice).
flags.DEFINE_multi_string("gin", [], "gin config file(s), applied in order")
flags.DEFINE_multi_string("gin_param", [], "gin bindings, e.g. train.num_steps=100")
flags.DEFINE_string("workdir", None, "run directory (overrides the configured workdir)")
flags.DEFINE_integer("steps", None, "number of training steps (overrides the configured "
                     "number)")

gin.external_configurable(CTCLIPConfig)
gin.external_configurable(CTViTConfig)
gin.external_configurable(BertConfig)
gin.external_configurable(SyntheticData)
gin.external_configurable(adamw_warmup_cosine)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


class ConfigError(ValueError):
    """A gin file or binding that cannot be used."""


def parse_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Parses gin files (then bindings) with errors that name the file or binding."""
    gin.clear_config()
    for path in files:
        if not os.path.exists(path):
            raise ConfigError(f"gin file {path!r} does not exist")
    gin.add_config_file_search_path(CONFIG_DIR)
    # Gin first looks for an `include`d file relative to the working directory and logs
    # an error before finding it on the search path; keep the console clean.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.FATAL)
    # One file or binding at a time, so that the error names the one that failed.
    where = ""
    try:
        for path in files:
            where = f"gin file {path}"
            gin.parse_config_file(path)
        for binding in bindings:
            where = f"--gin_param {binding}"
            gin.parse_config(binding)
        where = "gin configuration"
        gin.finalize()
    except (ValueError, KeyError, SyntaxError, IOError) as error:
        # Gin appends where in the text it failed, on lines of their own: one line here.
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        if where.startswith("--gin_param"):
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"invalid {where}: {detail}") from error
    finally:
        logging.set_verbosity(verbosity)
