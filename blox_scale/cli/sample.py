"""blox-sample: continue a prompt from a blox-train checkpoint (KV-cache decoding)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from blox_scale.cli.common import ArgumentParser, UsageError, run_cli


def _parser() -> ArgumentParser:
  parser = ArgumentParser(prog='blox-sample', description='Sample text from a blox-train checkpoint.')
  parser.add_argument('--checkpoint', required=True, help='A checkpoint directory (or a workdir) written by blox-train.')
  parser.add_argument('--prompt', required=True, help='Text to continue.')
  parser.add_argument('--max-new-tokens', type=int, default=200)
  parser.add_argument('--temperature', type=float, default=0.8, help='0 = greedy.')
  parser.add_argument('--top-k', type=int, default=0, help='0 = no limit.')
  parser.add_argument('--top-p', type=float, default=1.0, help='1.0 = no limit.')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--debug', action='store_true', help='Print the traceback of an error (also BLOX_DEBUG=1).')
  return parser


def _check_args(args) -> None:
  """Argument ranges, before JAX or orbax are touched."""
  rules = [
      ('--max-new-tokens', args.max_new_tokens, args.max_new_tokens >= 1, 'ask for at least 1 token'),
      ('--temperature', args.temperature, args.temperature >= 0, 'use 0 (greedy) or a positive temperature'),
      ('--top-k', args.top_k, args.top_k >= 0, 'use 0 (no limit) or a positive k'),
      ('--top-p', args.top_p, 0 < args.top_p <= 1, 'use a value in (0, 1]'),
      ('--seed', args.seed, args.seed >= 0, 'use a non-negative seed'),
      ('--prompt', args.prompt, bool(args.prompt), 'give some text to continue'),
  ]
  for flag, value, ok, fix in rules:
    if not ok:
      raise UsageError(f'{flag}={value!r}: out of range; {fix}')
  path = Path(args.checkpoint).absolute()
  if not path.exists():
    raise UsageError(f'--checkpoint={args.checkpoint}: does not exist; pass the train.workdir of a blox-train run')
  if not any((p / 'config.yaml').is_file() for p in (path, path.parent, path.parent.parent)):
    raise UsageError(f'--checkpoint={args.checkpoint}: no config.yaml there or in its parents; pass the '
                     'train.workdir of a blox-train run (or one of its checkpoints/<step> directories)')


def _main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  _check_args(args)

  from blox_scale.models.generate import generate
  from blox_scale.training.checkpoint import load_for_inference  # lazy: orbax is slow to import
  from blox_scale.training.tokenizer import get_tokenizer

  config, model, params = load_for_inference(args.checkpoint)
  if args.max_new_tokens >= config.model.max_seq_len:
    raise UsageError(f'--max-new-tokens={args.max_new_tokens}: the model holds at most model.max_seq_len='
                     f'{config.model.max_seq_len} tokens, prompt included; ask for fewer')
  tokenizer = get_tokenizer(config.data.tokenizer)
  prompt_ids = tokenizer.encode(args.prompt)
  room = config.model.max_seq_len - args.max_new_tokens
  if len(prompt_ids) > room:  # keep the end of a long prompt: it is what the continuation follows
    prompt_ids = prompt_ids[-max(room, 1):]
  [new] = generate(model, params, [prompt_ids], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  print(args.prompt + tokenizer.decode(new))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`blox-sample --checkpoint DIR --prompt TEXT [--debug]`: prints prompt + continuation; returns the exit status."""
  return run_cli('blox-sample', _main, argv)


if __name__ == '__main__':
  raise SystemExit(main())
