"""blox-sample: continue a prompt from a blox-train checkpoint or a Hugging Face model (KV-cache decoding).

    blox-sample --checkpoint runs/tiny --prompt 'def '
    blox-sample --hf path/to/hf_model --prompt 'The capital of France is'

`--checkpoint` uses the run's own tokenizer: the copy recorded in
`<workdir>/tokenizer/` when `data.tokenizer` was a file, else
`data.tokenizer` ('byte'). `--hf` loads the directory with `bs.hf.load` and
samples with the tokenizer it ships (`tokenizer.json` or `tokenizer.model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blox_scale.cli.common import ArgumentParser, UsageError, run_cli


def sample_text(model: Any, params: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
  """The continuation of `prompt` as text (prompt not included), cut at an end-of-document token.

  The prompt starts with the tokenizer's BOS as training documents did; a
  prompt longer than the model's context keeps its end. Only ids of the
  tokenizer's vocab are sampled (a model vocab may be padded beyond it).
  """
  from blox_scale.models.generate import generate

  prompt_ids = tokenizer.encode_prompt(prompt) or tokenizer.encode('\n')
  room = model.config.max_seq_len - max_new_tokens
  if len(prompt_ids) > room:  # keep the end of a long prompt: it is what the continuation follows
    prompt_ids = prompt_ids[-max(room, 1):]
  [new] = generate(model, params, [prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed, vocab_limit=tokenizer.vocab_size)
  if tokenizer.eos_id is not None and tokenizer.eos_id in new:
    new = new[:new.index(tokenizer.eos_id)]
  return tokenizer.decode(new)


def _parser() -> ArgumentParser:
  parser = ArgumentParser(prog='blox-sample', description='Sample text from a blox-train checkpoint or a '
                          'Hugging Face model directory.')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--checkpoint', help='A checkpoint directory (or a workdir) written by blox-train or blox-convert.')
  source.add_argument('--hf', metavar='DIR', help='A Hugging Face model directory (config.json, safetensors and '
                      'tokenizer.json or tokenizer.model), sampled with its own tokenizer.')
  parser.add_argument('--prompt', help='Text to continue (required; checked after --checkpoint/--hf).')
  parser.add_argument('--max-new-tokens', type=int, default=200)
  parser.add_argument('--temperature', type=float, default=0.8, help='0 = greedy.')
  parser.add_argument('--top-k', type=int, default=0, help='0 = no limit.')
  parser.add_argument('--top-p', type=float, default=1.0, help='1.0 = no limit.')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'float16'),
                      help='Param and compute dtype of a --hf model.')
  parser.add_argument('--debug', action='store_true', help='Print the traceback of an error (also BLOX_DEBUG=1).')
  return parser


def _check_args(args) -> None:
  """Argument ranges, before JAX or orbax are touched."""
  if args.prompt is None:
    raise UsageError('--prompt: required; give the text to continue, e.g. --prompt "def "')
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
  if args.hf is not None:
    if not (Path(args.hf) / 'config.json').is_file():
      raise UsageError(f'--hf={args.hf}: no config.json there; pass a Hugging Face model directory '
                       '(config.json, model.safetensors, tokenizer.json)')
    return
  path = Path(args.checkpoint).absolute()
  if not path.exists():
    raise UsageError(f'--checkpoint={args.checkpoint}: does not exist; pass the train.workdir of a blox-train run')
  if not any((p / 'config.yaml').is_file() for p in (path, path.parent, path.parent.parent)):
    raise UsageError(f'--checkpoint={args.checkpoint}: no config.yaml there or in its parents; pass the '
                     'train.workdir of a blox-train run (or one of its checkpoints/<step> directories)')


def _load(args) -> tuple[Any, Any, Any]:
  """`(model, params, tokenizer)` from `--checkpoint` or `--hf`; the vocab sizes are checked."""
  from blox_scale.training.tokenizer import check_vocab, get_tokenizer, run_tokenizer

  if args.hf is not None:
    from blox_scale.interop import hf  # lazy: safetensors
    tokenizer = get_tokenizer(args.hf, key='--hf')
    model, params = hf.load(args.hf, dtype=args.dtype)
    check_vocab(tokenizer, model.config.vocab_size, args.hf, key='--hf', model_key='vocab_size of its config.json')
    return model, params, tokenizer
  from blox_scale.models import build_model
  from blox_scale.models.protocol import check_can_decode
  from blox_scale.training.checkpoint import find_workdir, load_for_inference  # lazy: orbax is slow to import
  from blox_scale.training.config import read_config
  # A model.block without a KV-cache call form, a model.factory without decode: one line, before any weight is read.
  check_can_decode(build_model(read_config(find_workdir(args.checkpoint)[0]).model))
  config, model, params = load_for_inference(args.checkpoint)
  tokenizer = run_tokenizer(find_workdir(args.checkpoint)[0], config.data.tokenizer)
  check_vocab(tokenizer, config.model.vocab_size, config.data.tokenizer)
  return model, params, tokenizer


def _main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  _check_args(args)
  model, params, tokenizer = _load(args)
  if args.max_new_tokens >= model.config.max_seq_len:
    raise UsageError(f'--max-new-tokens={args.max_new_tokens}: the model holds at most model.max_seq_len='
                     f'{model.config.max_seq_len} tokens, prompt included; ask for fewer')
  print(args.prompt + sample_text(model, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`blox-sample (--checkpoint DIR | --hf DIR) --prompt TEXT [--debug]`: prints prompt + continuation; returns the exit status."""
  return run_cli('blox-sample', _main, argv)


if __name__ == '__main__':
  raise SystemExit(main())
