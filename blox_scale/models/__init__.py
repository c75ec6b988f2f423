"""Models built on `bs.Stack`, and `build_model`: the one place a config becomes a model."""

from __future__ import annotations

from typing import Any

import blox as bx
from blox_scale.models import plugin
from blox_scale.models.config import ModelConfig
from blox_scale.models.decoder import DecoderLM, LMHead
from blox_scale.models.protocol import Decoder, Model, PluginError, check_model


def decoder_lm(graph: bx.Graph, config: ModelConfig, rng: bx.Rng, **options: Any) -> DecoderLM:
  """The default model factory: `DecoderLM` (repeating `model.block`, or `TransformerBlock`)."""
  return DecoderLM(graph, config, rng=rng, **options)


def build_model(config: ModelConfig, **options: Any) -> Model:
  """The model of `config` (the `model:` section of a run), under the graph root 'lm'.

  Every tool builds its model here (blox-train, blox-plan, blox-sample,
  blox-convert, checkpoint restore and resume): `model.factory` names the
  function that builds it (models/protocol.py), default `decoder_lm`.
  `options`: DecoderLM keywords that are not part of the config
  (e.g. `attention_impl='cudnn'`).
  """
  graph = bx.Graph('lm')
  rng = bx.Rng(graph.child('rng'))
  if not config.factory:
    return decoder_lm(graph, config, rng, **options)
  if config.block:
    raise PluginError(f'model.factory={config.factory!r} and model.block={config.block!r}: a whole-model factory '
                      'builds its own layers; set only one of them')
  if options:
    raise TypeError(f'build_model: {sorted(options)} are DecoderLM options; model.factory={config.factory!r} '
                    'takes its options from model.factory_args')
  factory = plugin.resolve(config.factory, 'model.factory')
  return check_model(factory(graph, config, rng), config.factory)


__all__ = ['Decoder', 'DecoderLM', 'LMHead', 'Model', 'ModelConfig', 'build_model', 'decoder_lm']
