"""`python -m experiments.evaluate` end to end on a 2-step tiny pretraining run."""

import csv
import json

import numpy as np
import pytest
from test_pretrain import TINY_MODEL, data_bindings, run_pretrain

from ct_rate_jax import checkpoint_io
from ct_rate_jax.evaluation import (map_at_k, optimistic_metrics, recall_at_k,
                                    zero_shot_scores)
from ct_rate_jax.evaluation.retrieval import cosine_similarity
from experiments import evaluate
from experiments.convert_official import load_workdir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_run(tiny_synthetic_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    done = run_pretrain(workdir, TINY_MODEL + data_bindings(tiny_synthetic_data), steps=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def evaluated(trained_run, tiny_synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    status = evaluate.main(["--workdir", str(trained_run),
                            "--data", tiny_synthetic_data.shard_dir("train"),
                            "--val-data", tiny_synthetic_data.shard_dir("valid"),
                            "--out", str(out), "--bootstrap", "50", "--batch-size", "8"])
    assert status == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_outputs_are_complete(evaluated):
    out, metrics = evaluated
    run = metrics["run"]
    assert run["checkpoint"]["step"] == 2 and run["checkpoint"]["kind"] == "pretraining workdir"
    assert len(run["data"]["test"]["manifest_sha256"]) == 64
    assert run["templates"] == ["{name} is present.", "{name} is not present."]
    assert "optimistic" in run["protocols"]["a"] and "held-out" in run["protocols"]["b"]
    assert {"jax", "numpy", "scikit-learn"} <= set(run["versions"])
    zero_shot = metrics["zero_shot"]
    assert len(zero_shot["auroc"]) == 18 and len(zero_shot["auroc_ci"]) == 18
    ci = zero_shot["macro_auroc_ci"]
    assert ci["low"] <= zero_shot["mean_auroc"] <= ci["high"] and ci["low"] < ci["high"]
    for protocol in ("optimistic", "held_out"):
        section = metrics["classification"][protocol]
        assert len(section["per_class"]) == 18 and "f1" in section["macro"]
        assert "weighted" in section["confidence_intervals"]["f1"]
    retrieval = metrics["retrieval"]
    n = zero_shot["num_volumes"]
    assert retrieval["volume_to_volume"]["ks"] == [k for k in (1, 5, 10, 50) if k < n]
    assert retrieval["report_to_volume"]["ks"] == [k for k in (5, 10, 50, 100) if k <= n]
    assert set(retrieval["standard"]["volume_to_report"]) == {"R@1", "R@5", "R@10"}
    assert retrieval["report_to_volume"]["random_embedding_recall_at_k"]
    assert any("left out" in note for note in metrics["notes"])  # k = 50 with few volumes

    for name in ("roc_curves.png", "pr_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "OPTIMISTIC" in report and "held-out" in report and "Recall@k" in report
    assert run["model_kind"] == "CT-CLIP" and run["scoring"]["section"] == "zero_shot"
    # report.html: the same tables (one per Markdown table) and both plots embedded.
    html = (out / "report.html").read_text()
    assert html.count("<table>") == sum(line.startswith("|---")
                                        for line in report.splitlines())
    assert "OPTIMISTIC" in html and html.count("data:image/png;base64,") == 2
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == n and list(rows[0])[0] == "VolumeName"
    assert len({r["VolumeName"] for r in rows}) == n



@pytest.mark.slow
def test_numbers_match_the_library_on_the_same_latents(evaluated):
    out, metrics = evaluated
    latents = np.load(out / "latents.npz")
    labels = latents["labels"]
    scores = zero_shot_scores(latents["image_latents"], latents["positive_prompt_latents"],
                              latents["negative_prompt_latents"], float(latents["logit_scale"]))
    rows = list(csv.DictReader((out / "scores.csv").open()))
    names = list(metrics["zero_shot"]["auroc"])
    from_csv = np.array([[float(r[f"score: {n}"]) for n in names] for r in rows])
    np.testing.assert_array_equal(from_csv, scores)
    assert [r["VolumeName"] for r in rows] == list(latents["volume_names"])

    optimistic = optimistic_metrics(labels, scores, names)
    assert metrics["classification"]["optimistic"]["macro"]["f1"] == pytest.approx(
        optimistic.macro["f1"])
    binary = (labels == 1).astype(int)
    image_sim = cosine_similarity(latents["image_latents"], latents["image_latents"])
    assert metrics["retrieval"]["volume_to_volume"]["map_at_k"]["5"] == pytest.approx(
        map_at_k(binary, binary, image_sim, 5))
    text_sim = cosine_similarity(latents["text_latents"], latents["image_latents"])
    recall = metrics["retrieval"]
    assert recall["report_to_volume"]["recall_at_k"]["10"] == recall_at_k(text_sim, 10)
    assert recall["standard"]["volume_to_report"]["R@5"] == recall_at_k(text_sim.T, 5)


@pytest.mark.slow
def test_model_directory_and_user_errors(trained_run, tiny_synthetic_data,
                                         tmp_path, capsys):
    model_dir = tmp_path / "model"
    checkpoint_io.save_converted(model_dir, load_workdir(str(trained_run)))
    valid = tiny_synthetic_data.shard_dir("valid")
    status = evaluate.main(["--checkpoint", str(model_dir), "--data", valid,
                            "--tokenizer", tiny_synthetic_data.tokenizer_path,
                            "--text-sections", "findings", "impressions",
                            "--max-text-length", "32", "--out", str(tmp_path / "out"),
                            "--bootstrap", "0"])
    assert status == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["run"]["checkpoint"]["kind"] == "model directory"
    # The same zero-shot numbers as the pretraining run's own evaluation of these shards.
    trained = json.loads((trained_run / "zero_shot.json").read_text())
    assert metrics["zero_shot"]["num_volumes"] == trained["num_volumes"]
    for name, auroc in trained["auroc"].items():
        assert metrics["zero_shot"]["auroc"][name] == pytest.approx(auroc, abs=1e-9,
                                                                    nan_ok=True)
    assert metrics["classification"]["held_out"] is None

    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(model_dir), "--data", valid,
                          "--out", str(tmp_path / "x")]) == 1
    assert "--tokenizer is required" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(trained_run), "--data", "/no/such/shards",
                          "--out", str(tmp_path / "x")]) == 1
    assert "/no/such/shards" in capsys.readouterr().err


@pytest.mark.slow
def test_shares_of_several_processes_gather_to_the_single_process_result(
        tiny_model_dir, tiny_synthetic_data):
    """Each of 2 processes embeds its share (called here with process_index /
    process_count, in this one process); merged, they are the single-process set."""
    from ct_rate_jax.evaluation import distributed, embedding

    embedder = embedding.Embedder(checkpoint_io.load_converted(tiny_model_dir)[0])
    common = (tiny_synthetic_data.shard_dir("train"), tiny_synthetic_data.tokenizer_path, 32,
              ("findings",), 4)
    whole = evaluate.embed_shards(embedder, *common, texts=False)
    shares = [evaluate.embed_shards(embedder, *common, texts=False, process_index=p,
                                    process_count=2) for p in range(2)]
    assert 0 < len(shares[0][0]) < len(whole)
    merged = distributed.merge_parts(shares)
    assert merged.volume_names == whole.volume_names
    np.testing.assert_array_equal(merged.labels, whole.labels)
    np.testing.assert_allclose(merged.image_latents, whole.image_latents, atol=1e-6)
