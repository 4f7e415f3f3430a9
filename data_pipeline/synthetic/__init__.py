"""Synthetic CT-RATE release: chest CT phantoms with the 18 abnormalities, reports,
labels and metadata in exactly the layout of the real release, for offline tests and
the CPU demo (see docs/synthetic_data.md).

    python -m data_pipeline.synthetic --out DIR --num-volumes N --seed S

Orientation convention (the official CT-CLIP code reads ``nib.load(p).get_fdata()``
as (H, W, D) and transposes (2, 0, 1) to (D, H, W)), so every volume is written as
int16 data (H, W, D) with

* axis 0 = rows: anterior -> posterior,
* axis 1 = columns: patient right -> patient left,
* axis 2 = slices: inferior -> superior,

and a diagonal affine diag(xy, xy, z, 1).  Stored values are
``round((HU - RescaleIntercept) / RescaleSlope)``; the slope/intercept live only in the
metadata CSV (the NIfTI header carries no scaling, so ``get_fdata`` returns the stored
values, as for the release's original files).

Modules: `canvas` (grid and painting primitives), `anatomy` (the normal chest),
`abnormalities` (the 18 findings, `RENDERINGS`), `render` (`render_volume`), `labels`
(`PREVALENCES`), `reports`, `metadata`, `release` (`generate_release`, the CLI).
"""

from data_pipeline.synthetic.abnormalities import RENDERINGS
from data_pipeline.synthetic.labels import PREVALENCES
from data_pipeline.synthetic.release import ReleaseSummary, generate_release, main
from data_pipeline.synthetic.render import draw_plan, rasterize, render_volume
from data_pipeline.synthetic.reports import write_report

__all__ = ["PREVALENCES", "RENDERINGS", "ReleaseSummary", "draw_plan", "generate_release",
           "main", "rasterize", "render_volume", "write_report"]
