"""CT-RATE as a tensorflow-datasets ``ct_rate`` builder (ArrayRecord files, no TensorFlow).

Importing this package registers ``ct_rate`` with TFDS.  Reading needs no import
of it: ``tfds.data_source("ct_rate", data_dir=...)`` rebuilds the features from
the ``features.json`` written next to the shards.  See docs/data.md ("TFDS builder").
"""

from data_pipeline.tfds_ct_rate.ct_rate_builder import CtRate, CtRateConfig
from data_pipeline.tfds_ct_rate.features import (
    ct_rate_features,
    example_to_record,
    record_to_example,
)

__all__ = ["CtRate", "CtRateConfig", "ct_rate_features", "example_to_record",
           "record_to_example"]
