"""Running a CT-CLIP once over evaluation data: latents per volume, report and prompt.

Everything downstream (zero-shot scores, thresholds, retrieval) works on these arrays,
so the image encoder runs exactly once per volume and each prompt is embedded once.
The weights are replicated over this process's devices and each batch is split over
them (data parallel).  With several processes each embeds its own share of the data
on its own devices (`distributed` gathers the shares).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from ct_rate_jax import sharding
from ct_rate_jax.evaluation.runner import EmbeddedSet
from ct_rate_jax.models.ct_clip import CTCLIP

# (list of strings) -> (input_ids int[B, S], attention_mask int[B, S]); the caller's
# tokenizer, so that this module needs no data-pipeline code.
EncodeTexts = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


class Embedder:
    """Jitted latents of a CTCLIP on this process's devices.

    Batches of any size are padded to a multiple of the device count (padding rows are
    copies of the first row, dropped from the result), so each batch shape compiles once.
    """

    def __init__(self, model: CTCLIP, devices: Sequence[jax.Device] | None = None):
        self.mesh = sharding.make_mesh(-1, 1, 1, devices=list(devices or jax.local_devices()))
        self.rows = sharding.data_parallel_size(self.mesh)
        self.config = model.config
        self.logit_scale = float(jax.device_get(model.logit_scale()))
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, sharding.replicated(self.mesh))
        self._batch_sharding = sharding.batch_sharding(self.mesh)

        @jax.jit
        def images(state, volume_bdhw):
            return nnx.merge(graphdef, state).embed_image(volume_bdhw)

        @jax.jit
        def images_and_tokens(state, volume_bdhw):
            model = nnx.merge(graphdef, state)
            tokens = model.encode_image(volume_bdhw)
            return model.project_image_tokens(tokens), tokens

        @jax.jit
        def texts(state, input_ids, attention_mask):
            return nnx.merge(graphdef, state).embed_text(input_ids, attention_mask)

        self._images, self._images_and_tokens, self._texts = images, images_and_tokens, texts

    def _put(self, *arrays: np.ndarray) -> tuple[list[jax.Array], int]:
        count = len(arrays[0])
        extra = (-count) % self.rows
        padded = [np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) if extra else a
                  for a in map(np.asarray, arrays)]
        return [jax.device_put(a, self._batch_sharding) for a in padded], count

    def images(self, volume_bdhw: np.ndarray) -> np.ndarray:
        """float32[B, L] image latents of volumes float[B, D, H, W] in [-1, 1]."""
        (volume,), count = self._put(volume_bdhw)
        return np.asarray(jax.device_get(self._images(self._state, volume)))[:count]

    def images_and_tokens(self, volume_bdhw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32[B, L] latents, float[B, T, h, w, d] token grids)."""
        (volume,), count = self._put(volume_bdhw)
        latents, tokens = jax.device_get(self._images_and_tokens(self._state, volume))
        return np.asarray(latents)[:count], np.asarray(tokens, np.float32)[:count]

    def texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32[B, L] text latents of token ids and masks int[B, S]."""
        (ids, mask), count = self._put(input_ids, attention_mask)
        return np.asarray(jax.device_get(self._texts(self._state, ids, mask)))[:count]

    def prompts(self, prompts: Sequence[str], encode: EncodeTexts) -> np.ndarray:
        """float32[P, L] latents of prompt strings, one jitted call."""
        return self.texts(*encode(list(prompts)))


def embed_batches(embedder: Embedder, batches: Iterable[Mapping[str, np.ndarray]], *,
                  texts: bool = True, tokens: bool = False, total: int | None = None,
                  description: str = "embedding", allow_empty: bool = False) -> EmbeddedSet:
    """Runs the model over evaluation batches (dicts with volume, labels, volume_name,
    valid and, for `texts`, input_ids / attention_mask of the reports); rows with
    valid=False (padding) are dropped.  No valid row at all is an error unless
    `allow_empty` (a process whose share of a small set is empty)."""
    names, labels, images, reports, grids = [], [], [], [], []
    for batch in tqdm(batches, total=total, desc=description, unit="batch", leave=False):
        valid = np.asarray(batch["valid"], bool)
        if tokens:
            latents, grid = embedder.images_and_tokens(batch["volume"])
            grids.append(grid[valid])
        else:
            latents = embedder.images(batch["volume"])
        images.append(latents[valid])
        if texts:
            reports.append(embedder.texts(batch["input_ids"], batch["attention_mask"])[valid])
        labels.append(np.asarray(batch["labels"], np.float32)[valid])
        names.extend(str(n) for n in np.asarray(batch["volume_name"])[valid])
    if not names and not allow_empty:
        raise ValueError("the evaluation data holds no volumes")
    return EmbeddedSet(names, np.concatenate(labels), np.concatenate(images),
                       np.concatenate(reports) if texts else None,
                       np.concatenate(grids) if tokens else None)
