r"""Exports image latents (optionally token grids and report latents) keyed by VolumeName.

  python -m experiments.export_embeddings (--workdir W | --checkpoint C --tokenizer T) \
      --data SHARDS --out FILE.npz [--tokens] [--texts] [--batch-size 8]

Writes FILE.npz and FILE.parquet (same stem) with the model and preprocessing identity
in their metadata; `ct_rate_jax.evaluation.embedding_io` reads both back bitwise.
Input: prepared shards only (NIfTI / DICOM folders are not supported yet).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

from experiments import cli, evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.export_embeddings",
                                     description=__doc__.split("\n\n")[0])
    cli.add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="shard directory (manifest.json)")
    parser.add_argument("--out", required=True, help="FILE.npz; FILE.parquet is written too")
    parser.add_argument("--tokenizer", help="needed with --checkpoint (the data pipeline "
                        "tokenises every report)")
    parser.add_argument("--tokens", action="store_true",
                        help="also the CT-ViT token grid before pooling, float32[T, h, w, d]")
    parser.add_argument("--texts", action="store_true", help="also the reports' text latents")
    parser.add_argument("--text-sections", nargs="+", choices=("findings", "impressions"))
    parser.add_argument("--max-text-length", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gin", action="append", default=[])
    return parser.parse_args(argv)


def _sha256(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def export(args: argparse.Namespace) -> str:
    from ct_rate_jax.evaluation import embedding, embedding_io

    if not args.out.endswith(".npz"):
        raise ValueError(f"--out {args.out} must end in .npz (FILE.parquet goes next to it)")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    data = evaluate.data_record(args.data)
    model, checkpoint, tokenizer, length, sections = evaluate.load_model(args)
    evaluate.check_data_fits(args.data, model.config)
    embedder = embedding.Embedder(model)
    embedded = evaluate.embed_shards(embedder, args.data, tokenizer, length, sections,
                                     args.batch_size, texts=args.texts, tokens=args.tokens,
                                     description="volumes")
    metadata = {
        "model": {"checkpoint": checkpoint, "config": model.config.to_dict(),
                  "logit_scale": embedder.logit_scale},
        "data": data,
        # The model input: the manifest's preprocessing (grid, HU) then this mapping.
        "preprocessing": {"manifest": data["preprocessing"],
                          "normalisation": "clip HU to [-1000, 1000], divide by 1000"},
        "text": ({"tokenizer": os.path.abspath(tokenizer), "tokenizer_sha256":
                  _sha256(tokenizer), "max_text_length": length,
                  "sections": list(sections)} if args.texts else None),
        "versions": evaluate.versions(),
    }
    arrays = {"image_latents": embedded.image_latents, "text_latents": embedded.text_latents,
              "tokens": embedded.tokens}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    embedding_io.save_npz(args.out, embedded.volume_names, arrays, metadata)
    parquet = args.out[:-len(".npz")] + ".parquet"
    embedding_io.save_parquet(parquet, embedded.volume_names, arrays, metadata)
    print(f"{len(embedded)} volumes -> {args.out}, {parquet} "
          f"({', '.join(k for k, v in arrays.items() if v is not None)})")
    return parquet


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (1 with one line for user errors)."""
    args = parse_args(argv)
    return cli.run_command(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
