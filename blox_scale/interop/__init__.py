"""Interoperability with other ecosystems: Hugging Face checkpoints (`bs.hf`).

`hf.py` is the API (`load`, `save`), `families.py` the per-family name and
config tables, `safetensors_io.py` the streaming safetensors reader/writer.
"""

from blox_scale.interop import hf

__all__ = ['hf']
