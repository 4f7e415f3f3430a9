r"""The official PyTorch CT-CLIP's training step, timed at a given size (for comparison).

  python -m benchmarks.torch_original_step --source /path/to/CT-CLIP \
         [--gin experiments/configs/bench_cpu.gin] [--steps 5]

`--source` is a checkout of the official repository (ibrahimethemhamamci/CT-CLIP; its
`transformer_maskgit/` and `CT_CLIP/` folders).  No code of it is part of this
project: it is imported from that path at run time.  It needs `einops`, `beartype` and
`vector-quantize-pytorch==1.1.2` importable (e.g. `pip install --target DIR ...` and
`PYTHONPATH=DIR`), besides torch and transformers.

What is built and timed, as the official `scripts/run_train.py` + `CTCLIPTrainer` do,
at the size of the gin config's `CTCLIPConfig`:
  CTViT(dim, codebook_size, image_size, patch_size, temporal_patch_size, spatial_depth,
        temporal_depth, dim_head, heads)  [VQ on: the official model always quantises]
  CTCLIP(image_encoder, text_encoder = transformers.BertModel(BertConfig(...)) with
         random weights (no download), dim_text, dim_image = h*w*dim, dim_latent)
  step: loss = clip(text, volume, return_loss=True); loss.backward();
        clip_grad_norm_(0.5); Adam(lr 1e-4, betas (0.9, 0.99)).step(); zero_grad()
        in float32 on the CPU, train mode (BERT dropout 0.1 as in HF's default).

Two things of the official code are worked around, neither changes the computation:
its modules hard-code `torch.device('cuda')` for small index tensors (we hand them a
`torch` whose `device()` is the CPU), and `CTCLIP.__init__` downloads the CXR-BERT
tokenizer, which the step never uses (we skip that call).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import types

import numpy as np


class _CpuTorch(types.ModuleType):
    """The `torch` module, except that `torch.device(...)` is always the CPU."""

    def __init__(self, torch_module):
        super().__init__("torch")
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def device(self, *args, **kwargs):
        return self._torch.device("cpu")


def _import_official(source: str):
    """(CTViT, CTCLIP) classes from a checkout of the official repository."""
    import torch

    for sub in ("transformer_maskgit", "CT_CLIP"):
        path = os.path.join(source, sub)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--source {source!r} has no {sub}/ folder: it must be a "
                                    "checkout of the official CT-CLIP repository")
        if path not in sys.path:
            sys.path.insert(0, path)
    # transformer_maskgit/__init__ imports its trainers (torchvision, accelerate, ...);
    # the encoder modules themselves only need torch, einops, beartype and
    # vector-quantize-pytorch, so load those modules without running that __init__.
    package = types.ModuleType("transformer_maskgit")
    package.__path__ = [os.path.join(source, "transformer_maskgit", "transformer_maskgit")]
    sys.modules.setdefault("transformer_maskgit", package)
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ImportError:  # only used by its image-saving helpers
            stub = types.ModuleType("torchvision")
            stub.transforms = types.SimpleNamespace(Compose=None, Resize=None)
            stub.utils = types.SimpleNamespace()
            sys.modules["torchvision"] = stub
    from transformer_maskgit import attention, ctvit

    cpu_torch = _CpuTorch(torch)
    attention.torch = cpu_torch
    ctvit.torch = cpu_torch
    import ct_clip.ct_clip as ct_clip_module

    ct_clip_module.BertTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: None)
    return ctvit.CTViT, ct_clip_module.CTCLIP


class OfficialStep:
    """The official model, Adam and a fixed random batch; `step()` runs one train step."""

    def __init__(self, source: str, config, batch_size: int, depth: int, text_length: int,
                 seed: int = 0, threads: int | None = None):
        import torch
        import transformers

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        ctvit_cls, ctclip_cls = _import_official(source)
        cfg = config.ctvit
        image_encoder = ctvit_cls(
            dim=cfg.dim, codebook_size=cfg.codebook_size, image_size=cfg.image_size,
            patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
            spatial_depth=cfg.spatial_depth, temporal_depth=cfg.temporal_depth,
            dim_head=cfg.dim_head, heads=cfg.heads)
        text = config.text
        text_encoder = transformers.BertModel(transformers.BertConfig(
            vocab_size=text.vocab_size, hidden_size=text.hidden_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            intermediate_size=text.intermediate_size,
            max_position_embeddings=text.max_position_embeddings))
        self.model = ctclip_cls(
            image_encoder=image_encoder, text_encoder=text_encoder,
            dim_text=text.hidden_size, dim_image=cfg.pooled_features,
            dim_latent=config.dim_latent, extra_latent_projection=False, use_mlm=False,
            downsample_image_embeds=False, use_all_token_embeds=False)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=(0.9, 0.99),
                                          eps=1e-8)
        rng = np.random.default_rng(seed)
        self.volume = torch.from_numpy(rng.uniform(
            -1, 1, (batch_size, 1, depth, cfg.image_size, cfg.image_size)).astype(np.float32))
        ids = rng.integers(1, text.vocab_size, (batch_size, text_length))
        self.text = types.SimpleNamespace(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.ones((batch_size, text_length), dtype=torch.long))
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        import torch

        # The official forward prints a line per call; keep the benchmark's output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            loss = self.model(self.text, self.volume, return_loss=True, device="cpu")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.5)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())

    def count_flops(self) -> float:
        """FLOPs of one train step by PyTorch's FlopCounterMode (matmuls and convs)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="checkout of the official CT-CLIP")
    parser.add_argument("--gin", action="append", default=[])
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    from benchmarks.train_step import load_settings

    settings = load_settings(args.gin or ["experiments/configs/bench_cpu.gin"], args.gin_param)
    official = OfficialStep(args.source, settings.model, settings.batch_size, settings.depth,
                            settings.text_length)
    official.step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        official.step()
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    print(f"official PyTorch step: {step_s:.3f} s (median of {args.steps}), "
          f"{settings.batch_size / step_s:.2f} volumes/s, "
          f"{official.count_flops() / 1e9:.1f} GFLOP/step (FlopCounterMode), "
          f"{official.parameters:,} parameters")


if __name__ == "__main__":
    main()
