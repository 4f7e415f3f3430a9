r"""Released CT-CHAT models (LLaVA style) -> a CT-CHAT checkpoint directory.

  python -m experiments.convert_ctchat --base Meta-Llama-3.1-8B-Instruct \
      --lora CT-CHAT-llama3.1-8B --out converted/ct_chat_llama3.1_8b            # LoRA merged
  python -m experiments.convert_ctchat --base BASE --lora LORA --out DIR --keep-lora
  python -m experiments.convert_ctchat --merged CT-CHAT-merged --out DIR

--base is the Hugging Face directory of the base LLM; --lora the release directory
(LLaVA config.json, adapter_config.json, adapter_model.safetensors / .bin,
non_lora_trainables.bin).  The output (docs/chat.md, "Loading the released CT-CHAT
models") loads with `ct_rate_jax.chat.checkpoint.load_chat_checkpoint` and
`python -m experiments.chat --checkpoint DIR`.  Needs PyTorch to read the `.bin` files
(weights_only=True).  Mistakes end with one error message and exit status 1.
"""

from __future__ import annotations

import argparse
import json

from experiments import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.convert_ctchat",
        description="Convert a released CT-CHAT model (base LLM + LoRA release, or a merged "
                    "LLaVA directory) into a CT-CHAT checkpoint directory.")
    parser.add_argument("--base", help="Hugging Face directory of the base LLM")
    parser.add_argument("--lora", help="the release: LLaVA config.json, PEFT adapter, "
                                       "non_lora_trainables.bin")
    parser.add_argument("--merged", help="instead of --base/--lora: a merged LLaVA directory")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--merge", dest="merge", action="store_true", default=True,
                      help="fold LoRA into the weights (default, as the original's loader)")
    mode.add_argument("--keep-lora", "--keep_lora", dest="merge", action="store_false",
                      help="keep LoRA as a separate adapter (out/lora/)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="storage dtype of the LLM weights (default %(default)s)")
    parser.add_argument("--max-shard-gb", "--max_shard_gb", dest="max_shard_gb", type=float,
                        default=4.0, help="size of each LLM safetensors file (default 4 GB)")
    args = parser.parse_args(argv)
    if args.merged and (args.base or args.lora):
        parser.error("--merged cannot be combined with --base / --lora")
    if not args.merged and not (args.base and args.lora):
        parser.error("give --base and --lora, or --merged")
    return args


def work(args: argparse.Namespace) -> dict:
    from ct_rate_jax.chat import ctchat_release

    shard = int(args.max_shard_gb * (1 << 30))
    if args.merged:
        summary = ctchat_release.convert_merged(args.merged, args.out, dtype=args.dtype,
                                                max_shard_bytes=shard)
    else:
        summary = ctchat_release.convert_release(args.base, args.lora, args.out,
                                                 merge=args.merge, dtype=args.dtype,
                                                 max_shard_bytes=shard)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run_command(lambda: work(args))


if __name__ == "__main__":
    raise SystemExit(main())
