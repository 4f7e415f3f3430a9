"""Training metrics to `<workdir>/metrics.jsonl`, TensorBoard event files and the console."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    return value


class MetricsWriter:
    """Writes one JSON object per logged step and mirrors scalars to TensorBoard.

    Only process 0 writes (pass `enabled=False` elsewhere).  The console shows a tqdm
    bar whose postfix carries loss and volumes/s; tqdm supplies the ETA.
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
                 enabled: bool = True, tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train",
                             unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, global_step=int(step))
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                  vol_per_s=f"{record.get('volumes_per_s', 0.0):.1f}",
                                  refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
