r"""Released CT-CLIP PyTorch checkpoints -> a model directory, and back.

  python -m experiments.convert_official --checkpoint CT-CLIP_v2.pt --out converted/ct_clip_v2
  python -m experiments.convert_official --checkpoint CT_LiPro_v2.pt --out converted/lipro_v2
  python -m experiments.convert_official --to-torch --from converted/ct_clip_v2 --out back.pt
  python -m experiments.convert_official --to-torch --from runs/ct_clip_v2 --out trained.pt

The defaults are the released v2 architecture, so the released files need only
--checkpoint; other sizes take --ctvit-kwargs / --bert-config / --dim-latent.  The output
directory holds the weights (orbax), config.json, model.gin and conversion.json; load it
with `ct_rate_jax.checkpoint_io.load_converted` or start pretraining from it with
`--gin DIR/model.gin --gin_param "train.init_checkpoint='DIR'"` (docs/checkpoints.md).

--to-torch reads a converted directory or a pretraining workdir (its newest checkpoint,
or --step) and writes a state dict that the official `CTCLIP.load` (or, for a LiPro
directory, `ImageLatentsClassifier.load`) accepts as it is: unused official entries are
filled with placeholders (--minimal leaves them out: load with strict=False then).

Mistakes (a missing file, keys or shapes that do not fit, a bad option) end with one
error message and exit status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ct_rate_jax import checkpoint_io, convert
from ct_rate_jax.models.ct_clip import CTCLIP
from ct_rate_jax.models.weight_io import StateDictMismatchError
from experiments import cli



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.convert_official",
        description="Convert the released CT-CLIP checkpoints to a model directory, or a "
                    "model directory / pretraining workdir back to a torch state dict.")
    parser.add_argument("--checkpoint", help="official .pt file to convert")
    parser.add_argument("--variant", choices=convert.VARIANTS,
                        help="release kind; detected from the file when omitted")
    parser.add_argument("--ctvit-kwargs", "--ctvit_kwargs", dest="ctvit_kwargs",
                        help="CTViT constructor arguments that differ from v2: a JSON object "
                             "or a .json file holding one")
    parser.add_argument("--bert-config", "--bert_config", dest="bert_config",
                        help="Hugging Face config.json of the text tower (or its directory); "
                             "default: CXR-BERT-specialized's")
    parser.add_argument("--dim-latent", "--dim_latent", dest="dim_latent", type=int,
                        default=convert.RELEASED_V2["dim_latent"],
                        help="size of the shared latent (default %(default)s)")
    parser.add_argument("--to-torch", "--to_torch", dest="to_torch", action="store_true",
                        help="export --from (a model directory or pretraining workdir) to .pt")
    parser.add_argument("--from", dest="source",
                        help="with --to-torch: a converted directory or a pretraining workdir")
    parser.add_argument("--step", type=int,
                        help="with --to-torch from a workdir: the checkpoint step "
                             "(default: the newest)")
    parser.add_argument("--minimal", action="store_true",
                        help="with --to-torch: only the weights CT-CLIP uses (the official "
                             "code must then load with strict=False)")
    parser.add_argument("--position-ids", "--position_ids", dest="position_ids",
                        action="store_true",
                        help="with --to-torch: add BERT's embeddings.position_ids, as the "
                             "released files do (needed by transformers < 4.31)")
    parser.add_argument("--out", required=True, help="output directory, or .pt file with "
                                                     "--to-torch")
    args = parser.parse_args(argv)
    if args.to_torch:
        if not args.source or args.checkpoint:
            parser.error("--to-torch takes --from (and not --checkpoint)")
    elif not args.checkpoint or args.source:
        parser.error("give --checkpoint FILE.pt (or --to-torch --from DIR)")
    return args


# ----------------------------------------------------------------------------------
# Official file -> model directory
# ----------------------------------------------------------------------------------

def _json_argument(value: str, flag: str) -> Any:
    try:
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                return json.load(f)
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag}: neither a JSON file nor JSON ({error})") from error


def official_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The official constructor arguments: v2 with the command line's changes."""
    config = {"ctvit": dict(convert.RELEASED_V2["ctvit"]),
              "bert_config": dict(convert.RELEASED_V2["bert_config"]),
              "dim_latent": args.dim_latent}
    if args.ctvit_kwargs:
        kwargs = _json_argument(args.ctvit_kwargs, "--ctvit-kwargs")
        if not isinstance(kwargs, dict):
            raise ValueError("--ctvit-kwargs: expected a JSON object of CTViT arguments")
        config["ctvit"].update(kwargs)
    if args.bert_config:
        path = args.bert_config
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--bert-config: {path} does not exist")
        config["bert_config"] = _json_argument(path, "--bert-config")
    return config


def convert_to_directory(args: argparse.Namespace) -> None:
    try:
        record = convert.convert_checkpoint(args.checkpoint, official_arguments(args),
                                            args.out, variant=args.variant)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(
            f"{args.checkpoint} does not fit the architecture asked for (v2 unless "
            f"--ctvit-kwargs, --bert-config or --dim-latent say otherwise):\n{error}"
        ) from error
    print(f"{args.checkpoint} ({record['variant']}, sha256 {record['sha256'][:12]}...) -> "
          f"{args.out}: {record['parameter_count']:,} parameters, "
          f"{len(record['ignored_keys'])} unused official entries dropped")


# ----------------------------------------------------------------------------------
# Model directory or pretraining workdir -> official file
# ----------------------------------------------------------------------------------

def checkpoint_steps(workdir: str) -> list[int]:
    """The complete checkpoints of a pretraining workdir, ascending (orbax renames a
    checkpoint to its bare step number only once it is complete)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else ()
    return sorted(int(n) for n in names if n.isdigit())


def load_workdir(workdir: str, step: int | None = None) -> CTCLIP:
    """The model of a pretraining workdir's checkpoint, configured by its config.gin."""
    import gin

    from experiments import gin_setup, pretrain  # noqa: F401  (registers `train`)

    config_path = os.path.join(workdir, "config.gin")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{workdir} is neither a converted model directory "
                                "(config.json, weights/) nor a pretraining workdir (config.gin)")
    gin_setup.parse_gin([config_path])
    try:
        model_config = gin.query_parameter("train.model").scoped_configurable_fn()
    finally:
        gin.clear_config()
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = checkpoint_steps(workdir)
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in "
                                f"{checkpoints} (steps there: {steps})")
    step = max(steps) if step is None else step
    model = checkpoint_io.abstract_ctclip(model_config)
    # The train state is (model, optimizer): the model is item "0" of the saved tree.
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpoint_io.restore_weights(model, path, root=("0",), what=f"{workdir} step {step}")
    return checkpoint_io.finish_model(model)


def convert_to_torch(args: argparse.Namespace) -> None:
    source = args.source
    if os.path.isfile(os.path.join(source, checkpoint_io.CONFIG_FILE)):
        model, extras = checkpoint_io.load_converted(source)
    else:
        model, extras = load_workdir(source, args.step), {}
    state = convert.official_state_dict(model, extras, placeholders=not args.minimal,
                                        position_ids=args.position_ids)
    convert.write_torch_checkpoint(state, args.out)
    layout = "ClassFine (LiPro)" if extras else "CTCLIP"
    print(f"{source} -> {args.out}: {layout} state dict, {len(state)} tensors"
          + (" (only the used weights: load with strict=False)" if args.minimal else ""))


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (1 with one message for user errors)."""
    args = parse_args(argv)
    work = convert_to_torch if args.to_torch else convert_to_directory
    return cli.run_command(lambda: work(args))


if __name__ == "__main__":
    sys.exit(main())
