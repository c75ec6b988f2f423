"""Models built on `bs.Stack`."""

from blox_scale.models.config import ModelConfig
from blox_scale.models.decoder import DecoderLM, LMHead

__all__ = ['DecoderLM', 'LMHead', 'ModelConfig']
