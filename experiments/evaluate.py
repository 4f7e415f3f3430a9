r"""Evaluates a CT-CLIP checkpoint: zero-shot detection, thresholds, retrieval, a report.

  python -m experiments.evaluate (--workdir W | --checkpoint C [--tokenizer T]) \
      --data SHARDS --out DIR [--val-data SHARDS2] [--bootstrap 1000] \
      [--templates '{name} is present.' '{name} is not present.'] [--batch-size 8]

--workdir: a pretraining run directory (its config.gin gives the model, tokenizer and
report text settings; the newest checkpoint gives the weights).  --checkpoint: a model
directory from `python -m experiments.convert_official` (then --tokenizer is needed).
A model directory from `experiments.linear_probe` (or the converted CT-LiPro release)
is scored by its ClassFine head; one from `experiments.vocabfine` (or the converted
VocabFine release) by the prompts, as CT-CLIP.  Writes DIR/metrics.json, report.md,
report.html, roc_curves.png, pr_curves.png, scores.csv and latents.npz;
docs/evaluation.md says what each holds.  Under several JAX processes each embeds its
share of the volumes and process 0 writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

import numpy as np

from experiments import cli

ENCODE_BATCH = 64  # prompts per text-encoder call
DEFAULT_TEMPLATES = ["{name} is present.", "{name} is not present."]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate",
                                     description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="shard directory to evaluate (manifest.json)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", help="tokenizer.json or a Hugging Face model directory "
                        "(default with --workdir: the run's)")
    parser.add_argument("--gin", action="append", default=[],
                        help="extra gin file applied after the workdir's config.gin")
    parser.add_argument("--val-data", help="validation shards: thresholds for protocol (b)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the confidence intervals (0: none)")
    parser.add_argument("--templates", nargs=2, metavar=("POSITIVE", "NEGATIVE"),
                        default=list(DEFAULT_TEMPLATES))
    parser.add_argument("--batch-size", type=int, default=8, help="volumes per model call")
    parser.add_argument("--text-sections", nargs="+", choices=("findings", "impressions"),
                        help="report sections as text for report/volume retrieval "
                        "(default: the run's train.text_sections; findings + impressions "
                        "for --checkpoint)")
    parser.add_argument("--max-text-length", type=int,
                        help="tokens per text (default: the run's, or the model's maximum)")
    parser.add_argument("--threshold-criterion", default="closest",
                        choices=("closest", "youden", "f1"), help="protocol (b) criterion")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap and random baselines")
    parser.add_argument("--label-mapping", help="evaluate in another label set: "
                        "'rad_chestct' or a JSON file {\"classes\": {target: [CT-RATE "
                        "columns]}, \"merge\": \"max\"} (docs/evaluation.md)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------
# Where the model and its text settings come from
# ----------------------------------------------------------------------------------

def _workdir_settings(workdir: str, extra_gin: list[str]) -> dict:
    """Tokenizer, text length and sections the run trained with (from its config.gin)."""
    import gin

    from experiments import gin_setup, pretrain

    config_path = os.path.join(workdir, "config.gin")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--workdir {workdir} has no config.gin (is it a "
                                "pretraining run directory?)")
    defaults = {k: p.default for k, p in inspect.signature(pretrain.train).parameters.items()}

    def query(name):
        try:
            value = gin.query_parameter(f"train.{name}")
        except ValueError:
            return defaults[name]
        return value.scoped_configurable_fn() if hasattr(value, "scoped_configurable_fn") \
            else value

    gin_setup.parse_gin([config_path, *extra_gin])
    try:
        synthetic = query("synthetic_data")
        tokenizer = query("tokenizer") or (synthetic.tokenizer_path if synthetic else None)
        train_data = query("train_data") or (synthetic.shard_dir("train") if synthetic
                                             else None)
        return {"tokenizer": tokenizer, "max_text_length": query("max_text_length"),
                "text_sections": tuple(query("text_sections")), "train_data": train_data}
    finally:
        gin.clear_config()


@dataclasses.dataclass
class LoadedModel:
    """A model to evaluate and how to read its data.

    kind: "CT-CLIP", "VocabFine" (zero-shot with its weights) or "ClassFine" (`head`
      holds the linear head, {"classifier.weight": [C, L], "classifier.bias": [C]}).
    """

    model: Any
    record: dict
    tokenizer: str
    max_text_length: int
    text_sections: tuple[str, ...]
    kind: str = "CT-CLIP"
    head: dict | None = None
    # The preprocessing of the data it was trained on (a manifest's "preprocessing"),
    # when recorded, and where that record came from.
    training_preprocessing: dict | None = None
    preprocessing_source: str | None = None


def load_model(args: argparse.Namespace, need_tokenizer: bool = True) -> LoadedModel:
    """The model of --workdir or --checkpoint with its tokenizer and text settings.

    A model directory written by `experiments.linear_probe` / `experiments.vocabfine`
    (finetune.json) supplies the tokenizer and text settings its data was read with.
    """
    from ct_rate_jax import checkpoint_io
    from ct_rate_jax.finetune import directory

    extras: dict = {}
    preprocessing, preprocessing_source = None, None
    if args.workdir:
        from experiments.convert_official import checkpoint_steps, load_workdir

        settings = _workdir_settings(args.workdir, args.gin)
        model = load_workdir(args.workdir)
        record = {"kind": "pretraining workdir", "path": os.path.abspath(args.workdir),
                  "step": max(checkpoint_steps(args.workdir))}  # load_workdir's step
        manifest = os.path.join(settings["train_data"] or "", "manifest.json")
        if settings["train_data"] and os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as f:
                preprocessing = json.load(f).get("preprocessing")
            preprocessing_source = f"the run's training shards ({manifest})"
    else:
        if args.gin:
            raise ValueError("--gin applies to --workdir runs; a model directory's "
                             "config.json fixes the model")
        model, extras = checkpoint_io.load_converted(args.checkpoint)
        finetune = directory.read_finetune_record(args.checkpoint)
        settings = {"tokenizer": None, "text_sections": ("findings", "impressions"),
                    "max_text_length": min(512, model.config.text.max_position_embeddings)}
        if finetune:
            settings.update({k: finetune[k] for k in settings if finetune.get(k)})
        record = {"kind": "model directory", "path": os.path.abspath(args.checkpoint),
                  "step": None}
        conversion = directory.read_conversion_record(args.checkpoint)
        if conversion:
            record["conversion"] = conversion
        if finetune:
            record["finetune"] = {k: v for k, v in finetune.items() if k != "history"}
            train = (finetune.get("data") or {}).get("train") or {}
            if train.get("preprocessing"):
                preprocessing = train["preprocessing"]
                preprocessing_source = (f"the fine-tuning data of {args.checkpoint} "
                                        f"({train.get('manifest')})")
    kind = directory.model_kind(args.checkpoint, extras)
    record["model_kind"] = kind
    tokenizer = args.tokenizer or settings["tokenizer"]
    if not tokenizer and need_tokenizer:
        raise ValueError("--tokenizer is required with --checkpoint (a tokenizer.json or "
                         "a Hugging Face model directory with vocab.txt)")
    if tokenizer and not os.path.exists(tokenizer):
        raise FileNotFoundError(f"tokenizer {tokenizer!r} does not exist"
                                + ("" if args.tokenizer else " (from the run's settings; "
                                   "pass --tokenizer)"))
    length = getattr(args, "max_text_length", None) or settings["max_text_length"]
    sections = tuple(getattr(args, "text_sections", None) or settings["text_sections"])
    head = ({k: np.asarray(v, np.float32) for k, v in extras.items()}
            if kind == directory.CLASSFINE else None)
    return LoadedModel(model, record, tokenizer, length, sections, kind, head,
                       preprocessing, preprocessing_source)


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------

def data_record(shard_dir: str) -> dict:
    """Path, manifest sha256 (which lists every shard's sha256) and a summary."""
    from data_pipeline.prepare import MANIFEST_NAME, Manifest

    path = os.path.join(shard_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{shard_dir} has no {MANIFEST_NAME} (prepare shards with "
                                "python -m data_pipeline.prepare)")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    manifest = Manifest.load(path)
    return {"path": os.path.abspath(shard_dir), "manifest": os.path.abspath(path),
            "manifest_sha256": sha, "split": manifest.split,
            "num_records": manifest.num_records, "num_shards": len(manifest.shards),
            "preprocessing": manifest.preprocessing, "created": manifest.created}


def check_data_fits(shard_dir: str, config) -> None:
    from data_pipeline import input_pipeline

    shape = input_pipeline.peek_record(shard_dir).volume_hu.shape
    cfg = config.ctvit
    if shape[1] != cfg.image_size or shape[2] != cfg.image_size or not cfg.num_frames_ok(shape[0]):
        raise ValueError(f"volumes in {shard_dir} have shape (D, H, W) = {tuple(shape)}; the "
                         f"model expects H = W = {cfg.image_size} and D divisible by "
                         f"{cfg.temporal_patch_size}")


def embed_shards(embedder, shard_dir: str, tokenizer: str, max_text_length: int,
                 sections, batch_size: int, texts: bool = True, tokens: bool = False,
                 description: str = "embedding", process_index: int | None = None,
                 process_count: int | None = None):
    """EmbeddedSet of every record of a shard directory, in record order.

    With several processes (default: JAX's) each embeds its share
    (`distributed.process_rows`) and the shares are gathered on every process.  Passing
    `process_index` / `process_count` explicitly returns (this process's share, its
    record indices) without any exchange (tests, or a caller gathering itself).
    """
    import jax

    from ct_rate_jax.evaluation import distributed, embedding
    from data_pipeline import input_pipeline

    explicit = process_index is not None
    index = process_index if explicit else jax.process_index()
    count = process_count if explicit else jax.process_count()
    num_records = data_record(shard_dir)["num_records"]
    config = input_pipeline.PipelineConfig(
        shard_dir=shard_dir, tokenizer_path=tokenizer, global_batch_size=batch_size * count,
        max_text_length=max_text_length, text_sections=tuple(sections))
    total = -(-num_records // (batch_size * count))
    part = embedding.embed_batches(
        embedder, input_pipeline.iterate_eval_batches(config, process_index=index,
                                                      process_count=count),
        texts=texts, tokens=tokens, total=total, description=description,
        allow_empty=count > 1)
    rows = distributed.process_rows(num_records, batch_size, index, count)
    if explicit:
        return part, rows
    return distributed.allgather_embedded(part, rows, num_records, batch_size)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "numpy", "scikit-learn", "orbax-checkpoint",
                    "ct-rate-jax"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------

def evaluate(args: argparse.Namespace) -> dict:
    import jax

    from ct_rate_jax.evaluation import embedding, label_mapping, report, runner, zero_shot
    from ct_rate_jax.finetune import classfine
    from data_pipeline.tokenizer import TextEncoder

    if args.batch_size < 1 or args.bootstrap < 0:
        raise ValueError("--batch-size must be >= 1 and --bootstrap >= 0")
    for template in args.templates:
        if "{name}" not in template:
            raise ValueError(f"--templates {template!r} has no {{name}} placeholder")
    mapping = label_mapping.load_label_mapping(args.label_mapping) if args.label_mapping \
        else None
    test_data = data_record(args.data)
    val_data = data_record(args.val_data) if args.val_data else None
    loaded = load_model(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    length, sections = loaded.max_text_length, loaded.text_sections
    for shard_dir in filter(None, (args.data, args.val_data)):
        check_data_fits(shard_dir, model.config)
    head = loaded.head
    embedder = embedding.Embedder(model)
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    log(f"evaluating {loaded.record['path']} ({loaded.kind}) on {args.data} "
        f"({test_data['num_records']} volumes) with {jax.process_count()} process(es) x "
        f"{embedder.rows} {jax.devices()[0].platform} device(s)")

    settings = runner.EvaluationSettings(
        positive_template=args.templates[0], negative_template=args.templates[1],
        n_bootstrap=args.bootstrap, seed=args.seed,
        threshold_criterion=args.threshold_criterion)
    test = embed_shards(embedder, args.data, tokenizer, length, sections, args.batch_size,
                        description="test volumes")
    val = (embed_shards(embedder, args.val_data, tokenizer, length, sections,
                        args.batch_size, texts=False, description="validation volumes")
           if args.val_data else None)
    if head is not None:  # ClassFine: the head scores, no prompts
        scoring, prompt_latents = runner.CLASSFINE_SCORING, {}
        scores_of = lambda embedded: classfine.head_probabilities(  # noqa: E731
            head, embedded.image_latents)
    else:
        scoring = runner.ZERO_SHOT_SCORING
        encoder = TextEncoder.from_path(tokenizer, length)
        positive, negative = zero_shot.prompt_pairs(settings.names, *args.templates)
        prompts = positive + negative  # embedded once, together
        latents = np.concatenate([
            embedder.prompts(prompts[i:i + ENCODE_BATCH], encoder.encode_batch)
            for i in range(0, len(prompts), ENCODE_BATCH)])
        prompt_latents = dict(zip(("positive_prompt_latents", "negative_prompt_latents"),
                                  np.split(latents, 2)))
        scores_of = lambda embedded: zero_shot.zero_shot_scores(  # noqa: E731
            embedded.image_latents, *prompt_latents.values(), embedder.logit_scale)
    if not is_main:
        return {}  # the shares are gathered; process 0 computes and writes everything
    result = runner.evaluate_scores(test, scores_of(test), settings, val,
                                    scores_of(val) if val is not None else None,
                                    scoring=scoring, mapping=mapping)
    if head is not None and list(args.templates) != DEFAULT_TEMPLATES:
        result.metrics["notes"].append("--templates ignored: a ClassFine model is scored "
                                       "by its head, not by prompts")
    scoring_record = {
        "model_kind": loaded.kind, "section": scoring.section,
        "score": scoring.description,
        "templates": list(args.templates) if head is None else None,
        "label_mapping": args.label_mapping}
    metrics = {"run": {
        "checkpoint": loaded.record, "model_kind": loaded.kind, "scoring": scoring_record,
        "data": {"test": test_data, "validation": val_data},
        "tokenizer": os.path.abspath(tokenizer), "max_text_length": length,
        "report_text_sections": list(sections),
        "templates": scoring_record["templates"],
        "protocols": {"a": runner.thresholds.PROTOCOL_OPTIMISTIC,
                      "b": (runner.thresholds.PROTOCOL_VALIDATION.format(
                          criterion=args.threshold_criterion) if val else None)},
        "bootstrap_resamples": args.bootstrap, "seed": args.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": f"{jax.process_count()} process(es) x {embedder.rows} x "
                   f"{jax.devices()[0].device_kind}",
        "versions": versions(), "command": sys.argv[:1] + (args._argv or [])},
        **result.metrics, "logit_scale": embedder.logit_scale}
    paths = report.write_report(args.out, metrics, test.volume_names, list(result.names),
                                result.labels, result.scores, result.optimistic.thresholds)
    np.savez(os.path.join(args.out, "latents.npz"), volume_names=np.asarray(test.volume_names),
             labels=test.labels, image_latents=test.image_latents,
             text_latents=test.text_latents, logit_scale=embedder.logit_scale,
             **prompt_latents, **({f"head_{k}": v for k, v in head.items()} if head else {}))
    section = metrics[scoring.section]
    log(f"{loaded.kind}: mean AUROC {section['mean_auroc']:.3f} over "
        f"{section['num_volumes']} volumes; wrote "
        f"{', '.join(sorted(os.path.basename(p) for p in paths.values()))}, latents.npz "
        f"to {args.out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (1 with one line for user errors)."""
    args = parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    return cli.run_command(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
