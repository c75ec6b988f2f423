"""Memory-efficient fine-tuning: LoRA, freezing, a quantized frozen base, merge.

Model-side code (imports `nn`, `stacking`, `blox`; never training code):
  wrap.py    selecting projections by path pattern and wrapping them in place
  lora.py    `LoRA`, `add_lora`, `lora_dropout`
  quant.py   `Int8Base`, `add_int8_base`, `quantize` (int8 weights, per-channel scales)
  params.py  `freeze`, `freeze_base`, `unfreeze`, `init_new_params`, `count`, `nbytes`
  merge.py   `merge`: adapters folded into the base weights (`fold`/`merged_reader`: one kernel at a time)

    model = bs.DecoderLM(bx.Graph('lm'), config)            # the pretrained model's config
    bs.finetune.add_lora(model, ('attn/q', 'attn/v'), rank=8, alpha=16)
    params = bs.finetune.init_new_params(model, pretrained, seed=0)   # + adapters (B = 0)
    params = bs.finetune.freeze_base(params)                # only the adapters train
    ...train...
    plain = bs.finetune.merge(model, params)                # the base model's layout
"""

from blox_scale.finetune.lora import LoRA, WithLoRADropout, add_lora, lora_dropout, lora_modules
from blox_scale.finetune.merge import fold, lora_delta, merge, merged_reader
from blox_scale.finetune.params import count, freeze, freeze_base, init_new_params, is_adapter, nbytes, unfreeze
from blox_scale.finetune.quant import QUANT_MODES, Int8Base, add_int8_base, dequantize_array, quantize, quantize_array
from blox_scale.finetune.wrap import Wrapper, path_matches, projections

__all__ = ['LoRA', 'WithLoRADropout', 'add_lora', 'lora_dropout', 'lora_modules', 'merge', 'fold', 'merged_reader', 'lora_delta', 'freeze', 'freeze_base',
           'unfreeze', 'init_new_params', 'count', 'nbytes', 'is_adapter', 'Int8Base', 'add_int8_base', 'quantize',
           'quantize_array', 'dequantize_array', 'QUANT_MODES', 'Wrapper', 'path_matches', 'projections']
