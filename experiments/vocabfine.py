r"""VocabFine: fine-tunes a CT-CLIP end to end on the per-abnormality prompt pairs.

  python -m experiments.vocabfine (--workdir W | --checkpoint C [--tokenizer T]) \
      --train-data SHARDS --out MODEL_DIR [--epochs 10 | --steps N] [--batch-size 1] \
      [--lr 1e-5] [--weight-decay 0.1] [--warmup-steps 10000]

Each abnormality's pair ("{name} is present.", "{name} is not present.") is scored
against the volume as in zero-shot detection (softmax over the pair) and P(present) is
pulled towards the label by a squared error, the official loss
(ct_rate_jax/finetune/vocabfine.py); both encoders and the temperature train.  The
defaults are the official script's.  MODEL_DIR is a model directory (variant
"vocabfine") with finetune.json; evaluate it with
`python -m experiments.evaluate --checkpoint MODEL_DIR`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

from experiments import cli, evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.vocabfine",
                                     description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--train-data", required=True, help="training shards (manifest.json)")
    parser.add_argument("--out", required=True, help="output model directory (new)")
    parser.add_argument("--tokenizer", help="needed with --checkpoint")
    parser.add_argument("--gin", action="append", default=[])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=10)
    length.add_argument("--steps", type=int, help="train this many steps instead of epochs")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="volumes per step over all devices (official: 1)")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=10000)
    parser.add_argument("--grad-clip", type=float, default=0.0,
                        help="global-norm clipping (official: none = 0)")
    parser.add_argument("--templates", nargs=2, metavar=("POSITIVE", "NEGATIVE"),
                        default=["{name} is present.", "{name} is not present."])
    parser.add_argument("--seed", type=int, default=0, help="data order")
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args(argv)


def _mesh_for(batch_size: int):
    """A data-parallel mesh over as many local devices as divide the batch."""
    import jax

    from ct_rate_jax import sharding

    devices = jax.local_devices()
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return sharding.make_mesh(count, 1, 1, devices=devices[:count])


def finetune(args: argparse.Namespace) -> dict:
    import jax

    from ct_rate_jax import checkpoint_io
    from ct_rate_jax.evaluation import zero_shot
    from ct_rate_jax.finetune import classfine, directory, vocabfine
    from data_pipeline import input_pipeline
    from data_pipeline.schema import ABNORMALITIES
    from data_pipeline.tokenizer import TextEncoder

    if args.batch_size < 1 or args.log_every < 1 or args.warmup_steps < 0:
        raise ValueError("--batch-size and --log-every must be >= 1, --warmup-steps >= 0")
    if (args.steps is not None and args.steps < 1) or args.epochs < 1:
        raise ValueError("--steps and --epochs must be >= 1")
    for template in args.templates:
        if "{name}" not in template:
            raise ValueError(f"--templates {template!r} has no {{name}} placeholder")
    if jax.process_count() > 1:
        raise ValueError("experiments.vocabfine runs in a single process")
    if os.path.exists(os.path.join(args.out, checkpoint_io.WEIGHTS_DIR)):
        raise ValueError(f"--out {args.out} already holds a model; choose a new directory")
    train_data = evaluate.data_record(args.train_data)
    if train_data["num_records"] < args.batch_size:
        raise ValueError(f"{args.train_data} holds {train_data['num_records']} records, "
                         f"fewer than one batch of {args.batch_size}")
    loaded = evaluate.load_model(args)
    evaluate.check_data_fits(args.train_data, loaded.model.config)

    steps = args.steps or (train_data["num_records"] * args.epochs) // args.batch_size
    positive, negative = zero_shot.prompt_pairs(ABNORMALITIES, *args.templates)
    prompt_ids, prompt_mask = TextEncoder.from_path(
        loaded.tokenizer, loaded.max_text_length).encode_batch(positive + negative)
    tx = vocabfine.make_optimizer(args.lr, args.weight_decay, args.warmup_steps, steps,
                                  args.grad_clip or None)
    schedule = classfine.official_schedule(args.lr, args.warmup_steps, steps)
    trainer = vocabfine.VocabFineTrainer(loaded.model, tx, prompt_ids, prompt_mask,
                                         _mesh_for(args.batch_size))
    pipeline = input_pipeline.PipelineConfig(
        shard_dir=args.train_data, tokenizer_path=loaded.tokenizer,
        global_batch_size=args.batch_size, max_text_length=loaded.max_text_length,
        text_sections=loaded.text_sections, seed=args.seed)
    batches = iter(input_pipeline.make_train_dataset(
        pipeline, num_epochs=None if args.steps else args.epochs))
    print(f"VocabFine from {loaded.record['path']}: {steps} steps of {args.batch_size} "
          f"volume(s) on {trainer.mesh.size} device(s)")

    history, nonfinite, started = [], 0, time.perf_counter()  # nonfinite: on device
    for step in range(1, steps + 1):
        batch = next(batches)
        metrics = trainer.step(batch["volume"], batch["labels"].astype(np.float32))
        nonfinite = nonfinite + metrics["nonfinite"]  # no host sync per step
        if step % args.log_every == 0 or step == steps:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            values.pop("nonfinite")
            record = {"step": step, **values, "learning_rate": float(schedule(step - 1)),
                      "seconds": round(time.perf_counter() - started, 2)}
            history.append(record)
            print(f"step {step}: loss {record['loss']:.4f}, pair accuracy "
                  f"{record['pair_accuracy']:.3f}, lr {record['learning_rate']:.2e}")
    nonfinite = int(jax.device_get(nonfinite))
    if nonfinite:
        print(f"warning: {nonfinite} step(s) had a non-finite loss or gradient; their "
              "updates were not applied")

    model = trainer.model
    checkpoint_io.save_converted(args.out, model, conversion={
        "variant": "vocabfine", "source": "python -m experiments.vocabfine",
        "base": loaded.record})
    record = {
        "method": directory.VOCABFINE, "base": loaded.record,
        "data": {"train": train_data},
        "tokenizer": os.path.abspath(loaded.tokenizer),
        "max_text_length": loaded.max_text_length,
        "text_sections": list(loaded.text_sections),
        "settings": {"steps": steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                     "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                     "grad_clip_norm": args.grad_clip or None,
                     "templates": list(args.templates), "seed": args.seed,
                     "loss": "mean over known labels of (P(present) - label)^2"},
        "history": history, "nonfinite_steps": nonfinite,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": evaluate.versions(), "command": ["python -m experiments.vocabfine",
                                                     *args._argv],
    }
    directory.write_finetune_record(args.out, record)
    print(f"VocabFine model directory written to {args.out}")
    return record


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (1 with one line for user errors)."""
    args = parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    return cli.run_command(lambda: finetune(args))


if __name__ == "__main__":
    sys.exit(main())
