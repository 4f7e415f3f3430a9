"""English radiology reports in the style of CT-RATE, written from the labels.

Findings: one sentence per positive abnormality (at least half of each abnormality's
templates use its canonical name, one is the zero-shot prompt "{Name} is present."),
negated sentences for a random subset of the negatives (one template is the prompt
"{Name} is not present."), and normal-anatomy filler, shuffled.  Impressions: the
positives by their canonical names.  No positive template contains a negation and no
filler names an abnormality, so a sentence that names an abnormality and negates it
always belongs to a negative label.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.schema import ABNORMALITIES
from data_pipeline.synthetic.metadata import NOMINAL_SLICE_THICKNESS_MM

POSITIVE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Medical material": (
        "{Name} is present.", "{Name} consistent with a {device} is observed.",
        "{Name} ({device}) is noted in the thorax.", "A {device} is seen.",
        "Metallic foreign material compatible with a {device} is observed."),
    "Arterial wall calcification": (
        "{Name} is present.", "{Name} is observed in the thoracic aorta.",
        "Atherosclerotic {name} is noted in the aortic arch and descending aorta.",
        "Calcific atheromatous plaques are observed in the wall of the thoracic aorta.",
        "Aortic atherosclerotic calcifications are seen."),
    "Cardiomegaly": (
        "{Name} is present.", "{Name} is observed.",
        "There is {name} with an increased cardiothoracic ratio.", "The heart is enlarged.",
        "Heart size is increased."),
    "Pericardial effusion": (
        "{Name} is present.", "{Name} reaching {size} mm in thickness is observed.",
        "A {name} is noted around the heart.", "Fluid is seen in the pericardial space.",
        "Pericardial fluid with a thickness of {size} mm is seen."),
    "Coronary artery wall calcification": (
        "{Name} is present.", "{Name} is observed in the left anterior descending artery.",
        "{Name} is noted.", "Calcified plaques are seen in the coronary arteries.",
        "Atherosclerotic calcifications are observed along the coronary arteries."),
    "Hiatal hernia": (
        "{Name} is present.", "{Name} is observed.", "A sliding {name} is noted.",
        "Part of the stomach is seen herniated through the esophageal hiatus into the thorax.",
        "Herniation of the stomach into the posterior mediastinum is observed."),
    "Lymphadenopathy": (
        "{Name} is present.",
        "Mediastinal and hilar {name} is observed, the largest node measuring {size} mm in "
        "short axis.",
        "{Name} is noted in the mediastinum.", "Enlarged lymph nodes are seen in the mediastinum "
        "and hila.", "Pathologically enlarged lymph nodes measuring up to {size} mm are observed."),
    "Emphysema": (
        "{Name} is present.", "Centrilobular {name} is observed in both upper lobes.",
        "{Name} is noted in the upper lobes.", "Bullous changes are seen in the upper lobes.",
        "Areas of low attenuation with destruction of the lung parenchyma are observed in the "
        "upper zones."),
    "Atelectasis": (
        "{Name} is present.", "Subsegmental {name} is observed in the {lobe}.",
        "Plate-like {name} is noted in the {lobe}.",
        "Linear atelectatic changes are seen at the lung bases.",
        "A band-like density consistent with partial collapse is seen posteriorly in the {lobe}."),
    "Lung nodule": (
        "{Name} is present.", "{A_size} mm {name} is observed in the {lobe}.",
        "{Name} is present in the {lobe}.",
        "A solid nodular lesion measuring {size} mm is seen in the {lobe}.",
        "A soft-tissue density nodule is noted in the {lobe}."),
    "Lung opacity": (
        "{Name} is present.", "{Name} with ground-glass density is observed in the {lobe}.",
        "Patchy {name} is noted in the {lobe}.",
        "A ground-glass density area is seen in the {lobe}.",
        "Ground-glass opacities are observed in the {lobe}."),
    "Pulmonary fibrotic sequela": (
        "{Name} is present.", "{Name} is observed in the {lobe}.",
        "Parenchymal bands consistent with {name} are observed.",
        "Fibrotic bands are seen in both lungs.",
        "Linear fibrotic densities are observed in the {lobe}."),
    "Pleural effusion": (
        "{Name} is present.", "{Name} is present {side}.",
        "{Side_adj} {name} reaching {size} mm in thickness is observed.",
        "Fluid is seen in the pleural space {side}.", "Pleural fluid is noted {side}."),
    "Mosaic attenuation pattern": (
        "{Name} is present.", "{Name} is observed in both lungs.",
        "A {name} is noted, suggestive of small airway disease.",
        "Heterogeneous areas of increased and decreased lung attenuation are seen.",
        "Patchy regional differences in lung density are observed."),
    "Peribronchial thickening": (
        "{Name} is present.", "{Name} is observed in the central bronchi.",
        "{Name} is noted in both lungs.", "Bronchial wall thickening is seen.",
        "Thickened bronchial walls are observed."),
    "Consolidation": (
        "{Name} is present.", "{Name} with air bronchograms is observed in the {lobe}.",
        "An area of {name} is seen in the {lobe}.",
        "A dense parenchymal area containing air bronchograms is observed in the {lobe}.",
        "Airspace disease is seen in the {lobe}."),
    "Bronchiectasis": (
        "{Name} is present.", "Cylindrical {name} is observed in the {lobe}.",
        "{Name} is noted in the {lobe}.", "Dilated bronchi are seen in the {lobe}.",
        "Bronchial dilatation is observed in the lower lobes."),
    "Interlobular septal thickening": (
        "{Name} is present.", "{Name} is observed at the periphery of both lungs.",
        "Subpleural {name} is noted.", "Reticular densities are seen in the subpleural areas.",
        "A peripheral reticular pattern is observed in both lungs."),
}

NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "{Name} is not present.", "No {name} was detected.", "There is no {name}.",
    "No {name} was observed.", "No evidence of {name} was seen.")

# Normal-anatomy sentences, each with the labels it would contradict.
FILLER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Trachea and both main bronchi are open.", ()),
    ("Thoracic esophagus calibration was normal.", ("Hiatal hernia",)),
    ("Mediastinal structures were evaluated as normal.", ("Lymphadenopathy", "Hiatal hernia")),
    ("Heart contour and size are normal.", ("Cardiomegaly", "Pericardial effusion")),
    ("Mediastinal main vascular structures are of normal width.", ()),
    ("The thyroid gland is of normal size.", ()),
    ("No lytic or destructive lesion was detected in the bone structures within the scan area.",
     ()),
    ("Upper abdominal organs included in the sections are unremarkable.", ("Hiatal hernia",)),
    ("Both hemithoraces are symmetrical.", ("Pleural effusion",)),
    ("Aeration of both lungs is normal.", ABNORMALITIES[7:]),  # every lung finding
)

NORMAL_IMPRESSIONS = ("No significant pathology was detected.",
                      "No acute pathology was detected in the thorax.",
                      "Normal chest CT findings.")
CLINICAL_INFORMATION = ("Cough.", "Shortness of breath.", "Cough, shortness of breath.",
                        "Fever, cough.", "Chest pain.", "Malignancy screening.", "Dyspnea.",
                        "Follow-up.", "COVID-19 suspicion.", "Weight loss.")
TECHNIQUE = ("Non-contrast images were obtained in the axial plane with {t} mm slice thickness.",
             "Thorax CT was performed without contrast in the axial plane with {t} mm slice "
             "thickness.")
_SIDE_WORDS = {"right": ("on the right", "Right"), "left": ("on the left", "Left"),
               "bilateral": ("bilaterally", "Bilateral")}


def canonical(name: str) -> str:
    """Lower-case-first spelling for mid-sentence use, e.g. "lung nodule"."""
    return name[0].lower() + name[1:]


def _indefinite_size(size: int) -> str:
    """"A 9" or "An 18" (articles follow pronunciation of the number)."""
    return f"{'An' if str(size).startswith('8') or size in (11, 18) else 'A'} {size}"


def _fill(template: str, name: str, details: dict, rng: np.random.Generator) -> str:
    side = details.get("side") or ("right", "left", "bilateral")[rng.integers(3)]
    size = int(details.get("size_mm") or rng.integers(8, 25))
    lobe = details.get("lobe") or ("right upper lobe", "left lower lobe",
                                   "right lower lobe")[rng.integers(3)]
    return template.format(
        Name=name, name=canonical(name), side=_SIDE_WORDS[side][0],
        Side_adj=_SIDE_WORDS[side][1], size=size, A_size=_indefinite_size(size), lobe=lobe,
        device=details.get("device", "cardiac pacemaker"))


def _impression(name: str, details: dict) -> str:
    side = details.get("side")
    if name == "Pleural effusion" and side:
        return f"{_SIDE_WORDS[side][1]} {canonical(name)}."
    if name == "Lung nodule" and details.get("lobe"):
        return f"{name} in the {details['lobe']}."
    return f"{name}."


def write_report(labels, rng: np.random.Generator, details: dict[str, dict] | None = None,
                 *, slice_thickness: str | None = None,
                 negation_fraction: float = 0.2) -> dict[str, str]:
    """A report for one scan.

    Args:
      labels: 18 values (0/1) in ABNORMALITIES order.
      rng: randomness for template choice and order.
      details: per abnormality, what the rendering did ({"side", "lobe", "size_mm",
        "device"}); missing details are drawn at random.
      slice_thickness: nominal slice thickness for Technique_EN (e.g. "1.5"); drawn
        when None.
      negation_fraction: share of the negative labels that get a negated sentence.

    Returns:
      {"ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"}.
    """
    details = details or {}
    positives = [name for name, value in zip(ABNORMALITIES, labels) if value > 0]
    sentences = []
    for name in ABNORMALITIES:
        if name in positives:
            templates = POSITIVE_TEMPLATES[name]
            sentences.append(_fill(templates[rng.integers(len(templates))], name,
                                   details.get(name, {}), rng))
        elif rng.random() < negation_fraction:
            template = NEGATIVE_TEMPLATES[rng.integers(len(NEGATIVE_TEMPLATES))]
            sentences.append(_fill(template, name, {}, rng))
    fillers = [text for text, conflicts in FILLER if not set(conflicts) & set(positives)]
    chosen = rng.choice(len(fillers), size=min(len(fillers), int(rng.integers(2, 5))),
                        replace=False)
    sentences += [fillers[i] for i in chosen]
    order = rng.permutation(len(sentences))
    impressions = (" ".join(_impression(name, details.get(name, {})) for name in positives)
                   if positives else NORMAL_IMPRESSIONS[rng.integers(len(NORMAL_IMPRESSIONS))])
    clinical = CLINICAL_INFORMATION[rng.integers(len(CLINICAL_INFORMATION))]
    thickness = NOMINAL_SLICE_THICKNESS_MM[rng.integers(len(NOMINAL_SLICE_THICKNESS_MM))]
    technique = TECHNIQUE[rng.integers(len(TECHNIQUE))].format(t=slice_thickness or thickness)
    return {"ClinicalInformation_EN": clinical, "Technique_EN": technique,
            "Findings_EN": " ".join(sentences[i] for i in order),
            "Impressions_EN": impressions}
