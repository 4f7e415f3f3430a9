r"""Exports image latents (optionally token grids and report latents) keyed by VolumeName.

  python -m experiments.export_embeddings (--workdir W | --checkpoint C --tokenizer T) \
      --data SHARDS|SCAN.nii.gz|NIFTI_FOLDER|DICOM_FOLDER --out FILE.npz \
      [--tokens] [--texts] [--batch-size 8]

Writes FILE.npz and FILE.parquet (same stem) with the model and preprocessing identity
in their metadata; `ct_rate_jax.evaluation.embedding_io` reads both back bitwise.
--data that is not a shard folder (no manifest.json) is read as the user's own scans
(`data_pipeline.user_scans`) and preprocessed exactly as the checkpoint's training
data was (the training manifest's settings; the official CT-CLIP settings for a
converted release, which records none); a scan that cannot be read is skipped and
listed in the metadata.
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
    parser.add_argument("--data", required=True, help="shard directory (manifest.json), or "
                        "the user's scans: a NIfTI file, a folder of NIfTI files or DICOM "
                        "series")
    parser.add_argument("--out", required=True, help="FILE.npz; FILE.parquet is written too")
    parser.add_argument("--tokenizer", help="needed with --checkpoint and shards (the data "
                        "pipeline tokenises every report)")
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


def is_shard_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json"))


def user_preprocessing(loaded) -> tuple[object, str]:
    """(PreprocessConfig for the user's scans, where its settings come from)."""
    from data_pipeline.preprocess import PreprocessConfig

    fields = ("target_spacing_mm", "target_shape", "hu_window", "min_slices",
              "clip_before_resample")
    if loaded.training_preprocessing:
        recorded = loaded.training_preprocessing
        config = PreprocessConfig(**{k: tuple(recorded[k]) if isinstance(recorded[k], list)
                                     else recorded[k] for k in fields if k in recorded})
        return config, loaded.preprocessing_source
    return PreprocessConfig(), ("the official CT-CLIP preprocessing (the model records no "
                                "training manifest; the released models were trained on it)")


def embed_user_scans(embedder, path: str, config, batch_size: int, tokens: bool):
    """(EmbeddedSet of the scans at `path`, [per-volume info], [(file, error)])."""
    import numpy as np
    from tqdm import tqdm

    from ct_rate_jax.evaluation.report import json_safe
    from ct_rate_jax.evaluation.runner import EmbeddedSet
    from data_pipeline.input_pipeline import normalise_hu
    from data_pipeline.user_scans import iter_user_volumes

    names, infos, errors, latents, grids, pending = [], [], [], [], [], []

    def flush():
        volumes = np.stack(pending)
        if tokens:
            batch_latents, batch_grids = embedder.images_and_tokens(volumes)
            grids.append(batch_grids)
        else:
            batch_latents = embedder.images(volumes)
        latents.append(batch_latents)
        pending.clear()

    cfg = embedder.config.ctvit
    for name, volume_hu, info in tqdm(iter_user_volumes(path, config, errors=errors),
                                      desc="scans", unit="volume", leave=False):
        shape = volume_hu.shape
        if shape[1] != cfg.image_size or shape[2] != cfg.image_size \
                or not cfg.num_frames_ok(shape[0]):
            raise ValueError(f"{name}: preprocessed to (D, H, W) = {tuple(shape)}, but the "
                             f"model expects H = W = {cfg.image_size} and D divisible by "
                             f"{cfg.temporal_patch_size}")
        names.append(name)
        infos.append(json_safe(dict(info)))  # numpy scalars and tuples from the headers
        pending.append(normalise_hu(volume_hu))  # as the input pipeline does
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not names:
        raise ValueError(f"no scan under {path} could be read: "
                         + "; ".join(f"{f}: {e}" for f, e in errors[:5]))
    labels = np.full((len(names), 0), np.nan, np.float32)  # user scans carry no labels
    embedded = EmbeddedSet(names, labels, np.concatenate(latents), None,
                           np.concatenate(grids) if tokens else None)
    return embedded, infos, [list(e) for e in errors]


def export(args: argparse.Namespace) -> str:
    from ct_rate_jax.evaluation import embedding, embedding_io

    if not args.out.endswith(".npz"):
        raise ValueError(f"--out {args.out} must end in .npz (FILE.parquet goes next to it)")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data {args.data} does not exist")
    shards = is_shard_dir(args.data)
    if not shards and args.texts:
        raise ValueError(f"--texts needs prepared shards (reports); {args.data} holds "
                         "scans only")
    loaded = evaluate.load_model(args, need_tokenizer=shards)
    model, checkpoint, tokenizer = loaded.model, loaded.record, loaded.tokenizer
    length, sections = loaded.max_text_length, loaded.text_sections
    embedder = embedding.Embedder(model)
    normalisation = "clip HU to [-1000, 1000], divide by 1000"
    if shards:
        data = evaluate.data_record(args.data)
        evaluate.check_data_fits(args.data, model.config)
        embedded = evaluate.embed_shards(embedder, args.data, tokenizer, length, sections,
                                         args.batch_size, texts=args.texts,
                                         tokens=args.tokens, description="volumes")
        # The model input: the manifest's preprocessing (grid, HU) then this mapping.
        preprocessing = {"manifest": data["preprocessing"], "normalisation": normalisation}
    else:
        config, source = user_preprocessing(loaded)
        embedded, infos, errors = embed_user_scans(embedder, args.data, config,
                                                   args.batch_size, args.tokens)
        data = {"path": os.path.abspath(args.data), "kind": "user scans (NIfTI / DICOM)",
                "num_records": len(embedded), "volumes": dict(zip(embedded.volume_names,
                                                                   infos)),
                "skipped": errors}
        preprocessing = {"config": config.to_dict(), "source": source,
                         "normalisation": normalisation}
    metadata = {
        "model": {"checkpoint": checkpoint, "config": model.config.to_dict(),
                  "logit_scale": embedder.logit_scale},
        "data": data,
        "preprocessing": preprocessing,
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
