r"""ClassFine (linear probe) on a frozen CT-CLIP image encoder.

  python -m experiments.linear_probe (--workdir W | --checkpoint C [--tokenizer T]) \
      --train-data SHARDS --out MODEL_DIR [--val-data SHARDS2] [--epochs 10] \
      [--lr 1e-5] [--weight-decay 0.1] [--batch-size 8] [--warmup-steps 10000]

The encoder runs once per training volume (its latents are frozen) and only the head,
image latent -> ReLU -> dropout 0.3 -> Linear(L, 18), trains on the stored latents with
BCE weighted by each class's negatives / positives.  MODEL_DIR is a model directory in
the layout of the converted CT-LiPro release (the head as extras) with finetune.json;
`python -m experiments.evaluate --checkpoint MODEL_DIR` scores volumes with the head.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from experiments import cli, evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.linear_probe",
                                     description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--train-data", required=True, help="training shards (manifest.json)")
    parser.add_argument("--val-data", help="shards whose loss and mean AUROC are logged per "
                        "epoch (nothing is selected on them)")
    parser.add_argument("--out", required=True, help="output model directory (new)")
    parser.add_argument("--tokenizer", help="needed with --checkpoint (the data pipeline "
                        "tokenises every report)")
    parser.add_argument("--gin", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8, help="latents per head step")
    parser.add_argument("--warmup-steps", type=int, default=10000)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global norm; 0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-batch-size", type=int, default=8,
                        help="volumes per encoder call when computing the latents")
    return parser.parse_args(argv)


def probe(args: argparse.Namespace) -> dict:
    from ct_rate_jax import checkpoint_io
    from ct_rate_jax.evaluation import embedding
    from ct_rate_jax.finetune import classfine, directory
    from data_pipeline.schema import ABNORMALITIES

    settings = classfine.ClassFineSettings(
        learning_rate=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
        batch_size=args.batch_size, warmup_steps=args.warmup_steps, dropout=args.dropout,
        grad_clip_norm=args.grad_clip or None, seed=args.seed)
    settings.check()
    if args.encoder_batch_size < 1:
        raise ValueError("--encoder-batch-size must be >= 1")
    if os.path.exists(os.path.join(args.out, checkpoint_io.WEIGHTS_DIR)):
        raise ValueError(f"--out {args.out} already holds a model; choose a new directory")
    train_data = evaluate.data_record(args.train_data)
    val_data = evaluate.data_record(args.val_data) if args.val_data else None
    loaded = evaluate.load_model(args)
    for shard_dir in filter(None, (args.train_data, args.val_data)):
        evaluate.check_data_fits(shard_dir, loaded.model.config)

    embedder = embedding.Embedder(loaded.model)
    common = (loaded.tokenizer, loaded.max_text_length, loaded.text_sections,
              args.encoder_batch_size)
    train = evaluate.embed_shards(embedder, args.train_data, *common, texts=False,
                                  description="training latents")
    val = (evaluate.embed_shards(embedder, args.val_data, *common, texts=False,
                                 description="validation latents") if args.val_data else None)
    print(f"latents of {len(train)} training volumes computed once; training the head "
          f"({settings.epochs} epochs of {-(-len(train) // settings.batch_size)} steps)")
    result = classfine.train_head(train.image_latents, train.labels, settings,
                                  val=(val.image_latents, val.labels) if val else None,
                                  log=print)

    conversion = {"variant": "lipro", "source": "python -m experiments.linear_probe",
                  "base": loaded.record}
    checkpoint_io.save_converted(args.out, loaded.model, extras=result.head,
                                 conversion=conversion)
    record = {
        "method": directory.CLASSFINE, "base": loaded.record,
        "data": {"train": train_data, "validation": val_data},
        "tokenizer": os.path.abspath(loaded.tokenizer),
        "max_text_length": loaded.max_text_length,
        "text_sections": list(loaded.text_sections),
        "settings": {**vars(settings), "encoder": "frozen, eval mode; latents computed "
                     "once per volume"},
        "positive_weights": dict(zip(ABNORMALITIES, map(float, result.positive_weights))),
        "steps": result.steps, "history": result.history,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": evaluate.versions(), "command": ["python -m experiments.linear_probe",
                                                     *args._argv],
    }
    directory.write_finetune_record(args.out, record)
    print(f"ClassFine model directory written to {args.out}")
    return record


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (1 with one line for user errors)."""
    args = parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    return cli.run_command(lambda: probe(args))


if __name__ == "__main__":
    sys.exit(main())
