"""The 18 CT-RATE abnormalities as visible changes of the phantom: the registry.

Each abnormality has a `Rendering`: a one-line description (`RENDERINGS`), the mask
of the region it changes (used by the tests), a `draw` function that picks its random
size/location from the patient's anatomy, and either a `paint` function (drawn on top
of the normal chest) or a `modify` function (changes the anatomy before it is painted:
cardiomegaly, pericardial effusion, peribronchial thickening).  The functions live in
`mediastinal_findings` and `lung_findings`.

Everything is large and contrasty enough to survive resampling to the demo grid
(about 5.6 x 5.6 x 11.25 mm voxels).  `draw_findings` draws the parameters of all 18
whatever the labels, so that labels never shift the random stream: the same rng
renders the same patient with and without a finding.

`conspicuity` (1.0 = realistic, the descriptions below) exaggerates every finding so
that a small model can learn it on the coarse demo grid; each `draw_*` function says
how, and docs/synthetic_data.md summarises it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from data_pipeline.schema import ABNORMALITIES
from data_pipeline.synthetic import lung_findings as lung
from data_pipeline.synthetic import mediastinal_findings as mediastinal
from data_pipeline.synthetic.anatomy import Anatomy
from data_pipeline.synthetic.canvas import Canvas
from data_pipeline.synthetic.conspicuity import REALISTIC, check_conspicuity

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Rendering:
    description: str
    region: str  # canvas mask that holds every voxel the finding changes
    draw: Callable[[np.random.Generator, Anatomy, float], Params]  # (rng, anatomy, conspicuity)
    paint: Callable[[Canvas, Anatomy, Params], None] | None = None
    modify: Callable[[Anatomy, Params], Anatomy] | None = None  # may come with a paint


RENDERERS: dict[str, Rendering] = {
    "Medical material": Rendering(
        "a very bright (2600-3000 HU) cardiac pacemaker or port with its lead through the SVC "
        "into the heart, or 5-7 sternotomy wire loops", "body",
        mediastinal.draw_medical_material, mediastinal.paint_medical_material),
    "Arterial wall calcification": Rendering(
        "6-12 bright (700-900 HU) plaques, 12-25 mm long, on the wall of the ascending aorta, "
        "arch and descending aorta", "aorta",
        mediastinal.draw_arterial_wall_calcification,
        mediastinal.paint_arterial_wall_calcification),
    "Cardiomegaly": Rendering(
        "heart enlarged x1.35-1.45 along its long axis (x1.2-1.3 across, x1.1-1.2 "
        "craniocaudally), growing to the left-anterior and upwards into the lungs", "heart",
        mediastinal.draw_cardiomegaly, modify=mediastinal.modify_cardiomegaly),
    "Pericardial effusion": Rendering(
        "the epicardial fat ring (-100 HU) replaced by a 14-22 mm fluid rim (0-12 HU) "
        "around the heart", "heart",
        mediastinal.draw_pericardial_effusion, modify=mediastinal.modify_pericardial_effusion),
    "Coronary artery wall calcification": Rendering(
        "3-5 curved bright (800-1000 HU) segments, 6-7.6 mm thick, in the epicardial "
        "fat on the heart surface", "heart",
        mediastinal.draw_coronary_calcification, mediastinal.paint_coronary_calcification),
    "Hiatal hernia": Rendering(
        "a 45-65 mm stomach pouch behind the heart above the diaphragm: soft-tissue wall, "
        "anterior gas (-1000 HU) over mottled fluid/food", "cavity",
        mediastinal.draw_hiatal_hernia, mediastinal.paint_hiatal_hernia),
    "Lymphadenopathy": Rendering(
        "3-5 enlarged soft-tissue (45 HU) nodes, 18-28 mm short axis, at paratracheal, "
        "subcarinal, prevascular and hilar stations (at least one hilar)", "cavity",
        mediastinal.draw_lymphadenopathy, mediastinal.paint_lymphadenopathy),
    "Emphysema": Rendering(
        "upper lungs 40-60 HU darker plus 18-30 bullae (6-16 mm radius, -990 HU) in the upper "
        "halves of both lungs", "lungs",
        lung.draw_emphysema, lung.paint_emphysema, lung.modify_emphysema),
    "Atelectasis": Rendering(
        "a 12-18 mm thick plate of collapsed lung (~0 HU) across the posterior half of the "
        "lower lobe(s), 30-55 mm above the lung base", "lungs",
        lung.draw_atelectasis, lung.paint_atelectasis),
    "Lung nodule": Rendering(
        "1-3 soft-tissue (25-45 HU) spheres of 8-15 mm radius inside the lungs", "lungs",
        lung.draw_lung_nodule, lung.paint_lung_nodule),
    "Lung opacity": Rendering(
        "1-2 irregular ground-glass patches (~-500 HU), 50-110 mm across, in the lungs",
        "lungs", lung.draw_lung_opacity, lung.paint_lung_opacity),
    "Pulmonary fibrotic sequela": Rendering(
        "6-10 dense linear streaks (-80..-20 HU, 5-7 mm thick, 40-80 mm long) in the mid and "
        "upper lungs", "lungs",
        lung.draw_fibrotic_sequela, lung.paint_fibrotic_sequela),
    "Pleural effusion": Rendering(
        "a fluid (5-18 HU) crescent, 22-40 mm deep at the base and thinning upwards over "
        "90-150 mm, in the posterior dependent pleural space (right, left or both)", "lungs",
        lung.draw_pleural_effusion, lung.paint_pleural_effusion),
    "Mosaic attenuation pattern": Rendering(
        "a patchwork of irregular lobule-sized lung patches alternately 90-120 HU darker "
        "and brighter",
        "lungs", lung.draw_mosaic_attenuation, lung.paint_mosaic_attenuation),
    "Peribronchial thickening": Rendering(
        "the walls of the main, lobar and segmental bronchi thickened from 1.5 mm to "
        "4.5-6 mm of soft tissue", "cavity",
        lung.draw_peribronchial_thickening, modify=lung.modify_peribronchial_thickening),
    "Consolidation": Rendering(
        "an irregular 60-110 mm dense region (20-40 HU) in one lobe with three air "
        "bronchograms (-920 HU tubes)", "lungs",
        lung.draw_consolidation, lung.paint_consolidation),
    "Bronchiectasis": Rendering(
        "3-5 dilated air-filled tubes per affected lower lobe (lumen 5.5-8 mm radius, "
        "2.5-3.5 mm soft-tissue wall) running 50-85 mm from the hilum", "lungs",
        lung.draw_bronchiectasis, lung.paint_bronchiectasis),
    "Interlobular septal thickening": Rendering(
        "a reticular net of 2.2-3 mm septal lines (-200..-100 HU, 12-16 mm cells) within "
        "12-18 mm of the lung surface", "lungs",
        lung.draw_septal_thickening, lung.paint_septal_thickening),
}
assert tuple(RENDERERS) == ABNORMALITIES

RENDERINGS: dict[str, str] = {name: r.description for name, r in RENDERERS.items()}

# Painting order: diffuse changes first, focal dense findings over them, the brightest last.
PAINT_ORDER = (
    "Mosaic attenuation pattern", "Emphysema", "Pleural effusion", "Atelectasis",
    "Consolidation", "Lung opacity", "Interlobular septal thickening",
    "Pulmonary fibrotic sequela", "Lung nodule", "Bronchiectasis", "Lymphadenopathy",
    "Hiatal hernia", "Arterial wall calcification", "Coronary artery wall calcification",
    "Medical material")


def draw_findings(rng: np.random.Generator, anat: Anatomy,
                  conspicuity: float = REALISTIC) -> dict[str, Params]:
    """Parameters of all 18 abnormalities for one scan (drawn whatever the labels);
    `conspicuity` > 1 exaggerates them (docs/synthetic_data.md)."""
    conspicuity = check_conspicuity(conspicuity)
    return {name: rendering.draw(rng, anat, conspicuity)
            for name, rendering in RENDERERS.items()}
