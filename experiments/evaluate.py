r"""Evaluates a CT-CLIP checkpoint: zero-shot detection, thresholds, retrieval, a report.

  python -m experiments.evaluate (--workdir W | --checkpoint C [--tokenizer T]) \
      --data SHARDS --out DIR [--val-data SHARDS2] [--bootstrap 1000] \
      [--templates '{name} is present.' '{name} is not present.'] [--batch-size 8]

--workdir: a pretraining run directory (its config.gin gives the model, tokenizer and
report text settings; the newest checkpoint gives the weights).  --checkpoint: a model
directory from `python -m experiments.convert_official` (then --tokenizer is needed).
Writes DIR/metrics.json, report.md, roc_curves.png, pr_curves.png, scores.csv and
latents.npz; docs/evaluation.md says what each holds.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import os
import platform
import sys
from importlib import metadata

import numpy as np

from experiments import cli

ENCODE_BATCH = 64  # prompts per text-encoder call


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
                        default=["{name} is present.", "{name} is not present."])
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
        return {"tokenizer": tokenizer, "max_text_length": query("max_text_length"),
                "text_sections": tuple(query("text_sections"))}
    finally:
        gin.clear_config()


def load_model(args: argparse.Namespace):
    """(model, checkpoint record, tokenizer path, max text length, text sections)."""
    from ct_rate_jax import checkpoint_io

    if args.workdir:
        from experiments.convert_official import checkpoint_steps, load_workdir

        settings = _workdir_settings(args.workdir, args.gin)
        model = load_workdir(args.workdir)
        record = {"kind": "pretraining workdir", "path": os.path.abspath(args.workdir),
                  "step": max(checkpoint_steps(args.workdir))}  # load_workdir's step
    else:
        if args.gin:
            raise ValueError("--gin applies to --workdir runs; a model directory's "
                             "config.json fixes the model")
        model, _ = checkpoint_io.load_converted(args.checkpoint)
        settings = {"tokenizer": None, "text_sections": ("findings", "impressions"),
                    "max_text_length": min(512, model.config.text.max_position_embeddings)}
        record = {"kind": "model directory", "path": os.path.abspath(args.checkpoint),
                  "step": None}
        conversion = os.path.join(args.checkpoint, checkpoint_io.CONVERSION_FILE)
        if os.path.isfile(conversion):
            with open(conversion, encoding="utf-8") as f:
                record["conversion"] = json.load(f)
    tokenizer = args.tokenizer or settings["tokenizer"]
    if not tokenizer:
        raise ValueError("--tokenizer is required with --checkpoint (a tokenizer.json or "
                         "a Hugging Face model directory with vocab.txt)")
    if not os.path.exists(tokenizer):
        raise FileNotFoundError(f"tokenizer {tokenizer!r} does not exist"
                                + ("" if args.tokenizer else " (from the run's config.gin; "
                                   "pass --tokenizer)"))
    length = args.max_text_length or settings["max_text_length"]
    sections = tuple(args.text_sections or settings["text_sections"])
    return model, record, tokenizer, length, sections


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
                 description: str = "embedding"):
    """EmbeddedSet of every record of a shard directory (single process)."""
    from ct_rate_jax.evaluation import embedding
    from data_pipeline import input_pipeline

    config = input_pipeline.PipelineConfig(
        shard_dir=shard_dir, tokenizer_path=tokenizer, global_batch_size=batch_size,
        max_text_length=max_text_length, text_sections=tuple(sections))
    total = -(-data_record(shard_dir)["num_records"] // batch_size)
    return embedding.embed_batches(embedder, input_pipeline.iterate_eval_batches(config),
                                   texts=texts, tokens=tokens, total=total,
                                   description=description)


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

    from ct_rate_jax.evaluation import embedding, report, runner, zero_shot
    from data_pipeline.tokenizer import TextEncoder

    if args.batch_size < 1 or args.bootstrap < 0:
        raise ValueError("--batch-size must be >= 1 and --bootstrap >= 0")
    for template in args.templates:
        if "{name}" not in template:
            raise ValueError(f"--templates {template!r} has no {{name}} placeholder")
    test_data = data_record(args.data)
    val_data = data_record(args.val_data) if args.val_data else None
    model, checkpoint, tokenizer, length, sections = load_model(args)
    for shard_dir in filter(None, (args.data, args.val_data)):
        check_data_fits(shard_dir, model.config)
    encoder = TextEncoder.from_path(tokenizer, length)
    embedder = embedding.Embedder(model)
    print(f"evaluating {checkpoint['path']} on {args.data} "
          f"({test_data['num_records']} volumes) with {embedder.rows} "
          f"{jax.devices()[0].platform} device(s)")

    settings = runner.EvaluationSettings(
        positive_template=args.templates[0], negative_template=args.templates[1],
        n_bootstrap=args.bootstrap, seed=args.seed,
        threshold_criterion=args.threshold_criterion)
    positive, negative = zero_shot.prompt_pairs(settings.names, *args.templates)
    prompts = positive + negative  # embedded once, together
    prompt_latents = np.concatenate([
        embedder.prompts(prompts[i:i + ENCODE_BATCH], encoder.encode_batch)
        for i in range(0, len(prompts), ENCODE_BATCH)])
    positive_latents, negative_latents = np.split(prompt_latents, 2)
    test = embed_shards(embedder, args.data, tokenizer, length, sections, args.batch_size,
                        description="test volumes")
    val = (embed_shards(embedder, args.val_data, tokenizer, length, sections,
                        args.batch_size, texts=False, description="validation volumes")
           if args.val_data else None)
    result = runner.evaluate_embeddings(test, positive_latents, negative_latents,
                                        embedder.logit_scale, settings, val)

    metrics = {"run": {
        "checkpoint": checkpoint,
        "data": {"test": test_data, "validation": val_data},
        "tokenizer": os.path.abspath(tokenizer), "max_text_length": length,
        "report_text_sections": list(sections),
        "templates": list(args.templates),
        "protocols": {"a": runner.thresholds.PROTOCOL_OPTIMISTIC,
                      "b": (runner.thresholds.PROTOCOL_VALIDATION.format(
                          criterion=args.threshold_criterion) if val else None)},
        "bootstrap_resamples": args.bootstrap, "seed": args.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": f"{embedder.rows} x {jax.devices()[0].device_kind}",
        "versions": versions(), "command": sys.argv[:1] + (args._argv or [])},
        **result.metrics}
    paths = report.write_report(args.out, metrics, test.volume_names, list(settings.names),
                                test.labels, result.scores, result.optimistic.thresholds)
    np.savez(os.path.join(args.out, "latents.npz"), volume_names=np.asarray(test.volume_names),
             labels=test.labels, image_latents=test.image_latents,
             text_latents=test.text_latents, positive_prompt_latents=positive_latents,
             negative_prompt_latents=negative_latents, logit_scale=embedder.logit_scale)
    zs = metrics["zero_shot"]
    print(f"mean zero-shot AUROC {zs['mean_auroc']:.3f} over {zs['num_volumes']} volumes; "
          f"wrote {', '.join(sorted(os.path.basename(p) for p in paths.values()))}, "
          f"latents.npz to {args.out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (1 with one line for user errors)."""
    args = parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    return cli.run_command(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
