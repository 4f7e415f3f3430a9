r"""Decode speed with the KV cache: our jitted generation against transformers' generate.

  python -m benchmarks.decode_speed [--prompt 32] [--new-tokens 64] [--batch 1 4] [--repeats 7]
                                    [--single-thread] [--cpu N]

One small Llama-shaped model (`LLMConfig.small()`: 4 layers, hidden 512, 8 query / 4
key-value heads, vocabulary 32000; random weights) is created in transformers
(`LlamaForCausalLM`, float32, eager PyTorch on the CPU), saved as safetensors and loaded
into ours with `load_hf_llm`, so both run the same weights.  Both generate greedily the
same number of new tokens after the same random prompt (no early stop); the token ids are
checked to be equal.  Our `generate` is compiled before timing; the runs alternate
(torch, ours, torch, ours, ...) so that a busy machine slows both alike, and the median
is reported.  tokens/s = batch x new tokens / wall time of the whole call (prefill
included); the CPU time of this process per call (all its threads) is reported too, as
it is less sensitive than wall time to other jobs on the machine.  A measurement, not a
test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=32, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--single-thread", action="store_true",
                        help="one compute thread each (torch.set_num_threads(1), XLA without "
                             "its Eigen thread pool): fairer on a machine shared with others")
    parser.add_argument("--cpu", type=int, default=None,
                        help="pin the process to this CPU core (Linux): both libraries on "
                             "exactly one core, XLA's scheduler threads included")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.single_thread:  # must be set before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()

    import jax
    import torch
    import transformers

    import ct_rate_jax.models  # noqa: F401
    from ct_rate_jax.models.llm import LLMConfig
    from ct_rate_jax.models.llm_generate import SamplingConfig, generate
    from ct_rate_jax.models.llm_weights import load_hf_llm

    if args.single_thread:
        torch.set_num_threads(1)
    config = LLMConfig.small()
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**config.to_hf_config())).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model, _ = load_hf_llm(tmp)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    rows = []
    for batch in args.batch:
        prompt = np.random.default_rng(batch).integers(
            3, config.vocab_size, (batch, args.prompt)).astype(np.int32)
        prompt_torch = torch.tensor(prompt, dtype=torch.long)
        mask_torch = torch.ones_like(prompt_torch)

        def run_torch():
            with torch.no_grad():
                out = hf_model.generate(prompt_torch, attention_mask=mask_torch,
                                        do_sample=False, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, pad_token_id=0)
            return out[:, args.prompt:].numpy()

        def run_ours():
            return np.asarray(generate(model, prompt, sampling=sampling).tokens)

        same = bool((run_torch() == run_ours()).all())  # also compiles ours
        times = {"torch": [], "ours": []}
        cpu = {"torch": [], "ours": []}
        for _ in range(args.repeats):
            for name, run in (("torch", run_torch), ("ours", run_ours)):
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        median = {name: statistics.median(t) for name, t in times.items()}
        median_cpu = {name: statistics.median(t) for name, t in cpu.items()}
        rows.append((batch, median, median_cpu, same))

    tokens = lambda batch, seconds: batch * args.new_tokens / seconds  # noqa: E731
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
          f"core(s); torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, jax {jax.__version__} "
          f"({jax.devices()[0].platform}); load average {os.getloadavg()[0]:.1f}"
          + (f"; pinned to CPU {args.cpu}" if args.cpu is not None else ""))
    print(f"model: LLMConfig.small() float32, prompt {args.prompt} tokens, "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeats} alternating runs\n")
    print("| batch | transformers generate | ours (jitted, KV cache) | speed-up | CPU time "
          "torch / ours | same tokens |")
    print("|---|---|---|---|---|---|")
    for batch, median, median_cpu, same in rows:
        print(f"| {batch} | {median['torch']:.3f} s ({tokens(batch, median['torch']):.0f} tok/s)"
              f" | {median['ours']:.3f} s ({tokens(batch, median['ours']):.0f} tok/s) | "
              f"{median['torch'] / median['ours']:.2f}x | {median_cpu['torch']:.2f} s / "
              f"{median_cpu['ours']:.2f} s | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
