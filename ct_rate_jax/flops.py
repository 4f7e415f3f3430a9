"""Analytical model FLOPs of a CT-CLIP train step (MFU accounting).

Convention (the one MaxText and PaLM's MFU use):

* a matrix product of [M, K] by [K, N] costs 2·M·K·N FLOPs (one multiply, one add);
* the backward pass of a product costs twice its forward (the gradients with respect
  to both operands), so a trained component costs 3× its forward FLOPs per step;
* only matrix products and the PEG's depthwise convolution (27 multiply-adds per
  token and channel) are counted: LayerNorms, softmax, GELU, residual adds and
  l2-normalisation are left out (they are memory-bound and a few % of the total);
* parts without a gradient are counted once: the VQ codebook lookup (its input is
  `stop_gradient`ed; the straight-through estimator passes the gradient around it)
  and, in training, the codebook's EMA update;
* rematerialisation and gradient-caching's second forward pass are *not* counted:
  they are hardware work, not model work (MFU, not HFU).

`tests/test_flops.py` compares these counts with XLA's `cost_analysis()['flops']`
of the compiled forward and train step; XLA also counts the element-wise work, which
is where the (stated) differences come from.
"""

from __future__ import annotations

import dataclasses

from ct_rate_jax.models.bert import BertConfig
from ct_rate_jax.models.ct_clip import CTCLIPConfig
from ct_rate_jax.models.ctvit import CTViTConfig

# Components that have no gradient: counted once per step, not three times.
NO_GRADIENT = frozenset({"vq_lookup", "vq_update"})


def _matmul(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def _transformer_layer(tokens: float, seq: int, dim: int, heads: int, dim_head: int,
                       ff_inner: int) -> dict[str, float]:
    """One CT-ViT layer over `tokens` tokens in sequences of `seq`: forward FLOPs."""
    inner = heads * dim_head
    return {
        "peg": 2.0 * 27 * tokens * dim,
        "attention": (_matmul(tokens, dim, 3 * inner)          # q, k, v
                      + 2 * _matmul(tokens, seq, inner)        # q·kᵀ and attn·v
                      + _matmul(tokens, inner, dim)),          # output projection
        "mlp": _matmul(tokens, dim, 2 * ff_inner) + _matmul(tokens, ff_inner, dim),
    }


def ctvit_forward_flops(cfg: CTViTConfig, batch: int, depth: int, *,
                        train: bool) -> dict[str, float]:
    """Forward FLOPs of the CT-ViT on `batch` volumes of `depth` slices, by component."""
    h, w = cfg.grid_hw
    t = depth // cfg.temporal_patch_size
    tokens = float(batch * t * h * w)
    out: dict[str, float] = {"patch_embedding": _matmul(tokens, cfg.patch_dim, cfg.dim)}
    # The continuous position bias MLP (2 -> dim -> dim -> heads) over all (h·w)² pairs;
    # computed once per step, independent of the batch.
    pairs = float((h * w) ** 2)
    out["position_bias"] = (_matmul(pairs, 2, cfg.dim) + _matmul(pairs, cfg.dim, cfg.dim)
                            + _matmul(pairs, cfg.dim, cfg.heads))
    for name, layers, seq in (("spatial", cfg.spatial_depth, h * w),
                              ("temporal", cfg.temporal_depth, t)):
        layer = _transformer_layer(tokens, seq, cfg.dim, cfg.heads, cfg.dim_head,
                                   cfg.ff_inner_dim)
        out[f"{name}_peg"] = layers * layer["peg"]
        out[f"{name}_attention"] = layers * layer["attention"]
        out[f"{name}_mlp"] = layers * layer["mlp"]
    if cfg.use_vq:
        out["vq_lookup"] = _matmul(tokens, cfg.dim, cfg.codebook_size)
        if train:  # one-hot[N, K]ᵀ @ x[N, dim]: the per-code sums of the EMA
            out["vq_update"] = _matmul(cfg.codebook_size, tokens, cfg.dim)
    return out


def bert_forward_flops(cfg: BertConfig, batch: int, seq_len: int) -> dict[str, float]:
    """Forward FLOPs of the BERT encoder at the real (padded) token length."""
    tokens = float(batch * seq_len)
    hidden = cfg.hidden_size
    layers = cfg.num_hidden_layers
    return {
        "text_attention": layers * (_matmul(tokens, hidden, 3 * hidden)
                                    + 2 * _matmul(tokens, seq_len, hidden)
                                    + _matmul(tokens, hidden, hidden)),
        "text_mlp": layers * 2 * _matmul(tokens, hidden, cfg.intermediate_size),
    }


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step over the global batch, by component (forward only)."""

    forward_by_component: dict[str, float]

    @property
    def forward(self) -> float:
        return sum(self.forward_by_component.values())

    @property
    def train_step(self) -> float:
        """Model FLOPs of one train step: 3× forward where there is a gradient."""
        return sum(v if k in NO_GRADIENT else 3.0 * v
                   for k, v in self.forward_by_component.items())

    def table(self) -> str:
        total = self.train_step
        rows = [f"| {'component':<18} | {'forward GFLOP':>13} | {'train GFLOP':>11} | share |",
                f"|{'-' * 20}|{'-' * 15}|{'-' * 13}|-------|"]
        for name, value in self.forward_by_component.items():
            step = value if name in NO_GRADIENT else 3 * value
            rows.append(f"| {name:<18} | {value / 1e9:13.3f} | {step / 1e9:11.3f} | "
                        f"{100 * step / total:4.1f}% |")
        rows.append(f"| {'total':<18} | {self.forward / 1e9:13.3f} | {total / 1e9:11.3f} | "
                    "100% |")
        return "\n".join(rows)


def clip_step_flops(config: CTCLIPConfig, batch: int, depth: int, text_length: int, *,
                    train: bool = True) -> StepFlops:
    """Model FLOPs of CT-CLIP on a global batch of `batch` volumes [depth, H, W] and
    reports of `text_length` tokens (the padded length the step really runs)."""
    cfg = config.ctvit
    if depth % cfg.temporal_patch_size:
        raise ValueError(f"depth {depth} is not a multiple of the temporal patch size "
                         f"{cfg.temporal_patch_size}")
    parts = ctvit_forward_flops(cfg, batch, depth, train=train)
    parts.update(bert_forward_flops(config.text, batch, text_length))
    parts["projections"] = (_matmul(batch, cfg.pooled_features, config.dim_latent)
                            + _matmul(batch, config.text.hidden_size, config.dim_latent))
    parts["loss"] = _matmul(batch, config.dim_latent, batch)
    return StepFlops(parts)
