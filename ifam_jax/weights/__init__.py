"""Weights in and out: file formats, name tables, DINOv2 import, export and import of models.

  formats.py   safetensors and torch zip state dicts, read and written without torch
  names.py     the name tables: timm, official DINOv2 hub, HF transformers 4 and 5, the
               reference iFAM layout; and how each torch tensor becomes ours (`LAYOUTS`)
  dinov2.py    DINOv2 import: format detection, architecture inference, conversion, `load_dinov2`
  assign.py    name- and shape-checked assignment of converted arrays to a model
  exchange.py  `export` of trained weights (Orbax, safetensors, the reference's .pth) and their
               import (`import_to_workdir`, `load_exported`, `import_reference`)

Callers write `from ifam_jax import weights; weights.load_dinov2(model, path)`. `exchange` reads
and writes workdirs (it builds models from configs), so it is imported on its own:
`from ifam_jax.weights import exchange`; the rest depends on nothing above the models.
"""

from ifam_jax.weights.assign import load_params
from ifam_jax.weights.dinov2 import detect_format, dinov2_to_vit_params, load_dinov2
from ifam_jax.weights.formats import read_state_dict, read_torch_checkpoint, write_state_dict
from ifam_jax.weights.names import LAYOUTS, NAMES, reference_table, vit_table

__all__ = [
    'LAYOUTS', 'NAMES', 'detect_format', 'dinov2_to_vit_params', 'load_dinov2', 'load_params',
    'read_state_dict', 'read_torch_checkpoint', 'reference_table', 'vit_table',
    'write_state_dict',
]
