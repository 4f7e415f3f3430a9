"""report.html: report.md's tables as HTML with the plots embedded."""

import base64

from ct_rate_jax.evaluation import html_report

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16

MARKDOWN = """# CT-CLIP evaluation

* checkpoint: `run` (pretraining workdir)

## Zero-shot abnormality detection

Prompts `{name} is present.` with **bold** & <tags>.

| abnormality | positives | AUROC |
|---|---|---|
| Cardiomegaly | 3 | 0.750 (0.600–0.900) |
| **mean (macro)** |  | **0.750** |
"""


def test_tables_and_embedded_images(tmp_path):
    image = tmp_path / "roc.png"
    image.write_bytes(PNG)
    path = tmp_path / "report.html"
    html_report.write_html(str(path), MARKDOWN, {"ROC curves": str(image)})
    html = path.read_text()
    assert "<title>CT-CLIP evaluation</title>" in html
    assert "<h2>Zero-shot abnormality detection</h2>" in html
    assert "<th>abnormality</th><th>positives</th><th>AUROC</th>" in html
    assert "<td>Cardiomegaly</td><td>3</td><td>0.750 (0.600–0.900)</td>" in html
    assert "<td><strong>mean (macro)</strong></td>" in html
    assert "<li>checkpoint: <code>run</code> (pretraining workdir)</li>" in html
    assert "&amp; &lt;tags&gt;" in html  # escaped
    assert "data:image/png;base64," + base64.b64encode(PNG).decode() in html
    assert html.count("<table>") == 1 and html.count("<tr>") == 3
