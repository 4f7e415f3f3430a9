r"""Zero-shot evaluation: once per volume (ours) against once per abnormality (original).

  python -m benchmarks.zero_shot_speed [--volumes 64] [--batch-size 8] [--variant demo]

On one model (random weights, `variant(...)`) and random volumes of its input shape:

  ours       image encoder once per volume (batches of --batch-size), the 36 prompts
             once, scores for all 18 abnormalities from the latents
             (`experiments.evaluate`'s path: `Embedder`, `zero_shot_scores`);
  original   the official scripts/zero_shot.py loop: for every volume and every
             abnormality, encode the volume (batch 1) and its two prompts (batch 2)
             again and take the softmax over the pair.

Both use the same jitted functions, compiled before timing.  Checks that the scores
agree, prints a markdown table for docs/performance.md.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variant", default="demo")
    args = parser.parse_args()

    import jax
    from flax import nnx

    from ct_rate_jax.evaluation import embedding, zero_shot
    from ct_rate_jax.models.ct_clip import CTCLIP, variant
    from data_pipeline.schema import ABNORMALITIES
    from data_pipeline.tokenizer import TextEncoder, train_wordpiece_tokenizer

    config = variant(args.variant)
    model = CTCLIP(config, rngs=nnx.Rngs(0))
    positive, negative = zero_shot.prompt_pairs(ABNORMALITIES)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        train_wordpiece_tokenizer(positive + negative, 200, path)
        encoder = TextEncoder.from_path(path, 32)
    embedder = embedding.Embedder(model, devices=jax.local_devices()[:1])
    cfg = config.ctvit
    depth = cfg.temporal_patch_size * 8
    volumes = np.random.default_rng(0).uniform(
        -1, 1, (args.volumes, depth, cfg.image_size, cfg.image_size)).astype(np.float32)
    scale = embedder.logit_scale

    def ours():
        prompts = embedder.prompts(positive + negative, encoder.encode_batch)
        latents = np.concatenate([embedder.images(volumes[i:i + args.batch_size])
                                  for i in range(0, len(volumes), args.batch_size)])
        return zero_shot.zero_shot_scores(latents, *np.split(prompts, 2), scale)

    def original():
        scores = np.empty((len(volumes), len(ABNORMALITIES)))
        for n in range(len(volumes)):
            for c in range(len(ABNORMALITIES)):
                image = embedder.images(volumes[n:n + 1])
                text = embedder.prompts([positive[c], negative[c]], encoder.encode_batch)
                scores[n, c] = zero_shot.zero_shot_scores(image, text[:1], text[1:], scale)[0, 0]
        return scores

    # Compile every shape used (batch 1 / batch B images, 2 / 36 prompts) before timing.
    embedder.images(volumes[:1]), embedder.images(volumes[:args.batch_size])
    embedder.prompts(positive[:2], encoder.encode_batch)
    embedder.prompts(positive + negative, encoder.encode_batch)

    timings = {}
    for name, fn in (("ours", ours), ("original", original)):
        start = time.perf_counter()
        timings[name] = (fn(), time.perf_counter() - start)
    difference = float(np.abs(timings["ours"][0] - timings["original"][0]).max())
    speedup = timings["original"][1] / timings["ours"][1]
    print(f"{args.variant} model, {args.volumes} volumes of {volumes.shape[1:]}, "
          f"{len(ABNORMALITIES)} abnormalities, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)\n")
    print("| approach | image-encoder calls | wall time | volumes/s |")
    print("|---|---|---|---|")
    calls = {"ours": -(-args.volumes // args.batch_size),
             "original": args.volumes * len(ABNORMALITIES)}
    for name, (_, seconds) in timings.items():
        print(f"| {name} | {calls[name]} | {seconds:.2f} s | {args.volumes / seconds:.1f} |")
    print(f"\nspeed-up {speedup:.1f}x; largest score difference {difference:.1e}")
    if difference > 1e-4:
        raise SystemExit(f"the two approaches disagree (max |diff| {difference:.2e})")


if __name__ == "__main__":
    main()
