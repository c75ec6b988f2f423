"""blox-sample: continue a prompt from a blox-train checkpoint (KV-cache decoding)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from blox_scale.models.generate import generate


def main(argv: Sequence[str] | None = None) -> None:
  """`blox-sample --checkpoint DIR --prompt TEXT`: prints prompt + continuation."""
  parser = argparse.ArgumentParser(prog='blox-sample', description='Sample text from a blox-train checkpoint.')
  parser.add_argument('--checkpoint', required=True, help='A checkpoint directory (or a workdir) written by blox-train.')
  parser.add_argument('--prompt', required=True, help='Text to continue.')
  parser.add_argument('--max-new-tokens', type=int, default=200)
  parser.add_argument('--temperature', type=float, default=0.8, help='0 = greedy.')
  parser.add_argument('--top-k', type=int, default=0, help='0 = no limit.')
  parser.add_argument('--top-p', type=float, default=1.0, help='1.0 = no limit.')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  from blox_scale.training.checkpoint import load_for_inference  # lazy: orbax is slow to import
  from blox_scale.training.tokenizer import get_tokenizer

  config, model, params = load_for_inference(args.checkpoint)
  tokenizer = get_tokenizer(config.data.tokenizer)
  prompt_ids = tokenizer.encode(args.prompt)
  room = config.model.max_seq_len - args.max_new_tokens
  if len(prompt_ids) > room:  # keep the end of a long prompt: it is what the continuation follows
    prompt_ids = prompt_ids[-max(room, 1):]
  [new] = generate(model, params, [prompt_ids], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  print(args.prompt + tokenizer.decode(new))


if __name__ == '__main__':
  main()
