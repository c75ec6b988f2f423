"""Models built on `bs.Stack`, and `build_model`: the one place a config becomes a model."""

from __future__ import annotations

from typing import Any

import blox as bx
from blox_scale.models.config import ModelConfig
from blox_scale.models.decoder import DecoderLM, LMHead


def build_model(config: ModelConfig, **options: Any) -> DecoderLM:
  """The model of `config` (the `model:` section of a run), under the graph root 'lm'.

  Every tool builds its model here (blox-train, blox-plan, blox-sample,
  checkpoint restore), so a new model type is added in this one function.
  `options`: model keywords that are not part of the config
  (e.g. `attention_impl='cudnn'`).
  """
  return DecoderLM(bx.Graph('lm'), config, **options)


__all__ = ['DecoderLM', 'LMHead', 'ModelConfig', 'build_model']
