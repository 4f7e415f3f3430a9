"""The paper's two fine-tuning variants of CT-CLIP (docs/evaluation.md, "Fine-tuning").

`classfine`: a linear probe (ClassFine / LiPro) on frozen image latents.
`vocabfine`: end-to-end fine-tuning on the per-abnormality prompt pairs (VocabFine).
`directory`: the checkpoint directories both write and `experiments.evaluate` reads.
"""
