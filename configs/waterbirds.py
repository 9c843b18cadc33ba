"""Waterbirds (reference 6.6, 7.2): 518 px, batch 128 (8 GPUs x 16), lr 2.828e-6, 90 epochs.

  WB=/data/CUB_200_2011/waterbird_complete95_forest2water2
  W=/models/vit_base_patch14_reg4_dinov2.lvd142m.safetensors
  python -m ifam_jax.main --config configs/waterbirds.py:root=$WB,weights=$W --workdir /tmp/wb
  python -m ifam_jax.main --config configs/waterbirds.py:root=$WB,weights=$W,baseline \
      --workdir /tmp/wb_erm

`root` is the folder holding metadata.csv. Arguments: `num_parts=K` (default 1; the paper
reports K = 1, 4, 8, 16), `baseline` (the ERM row: a plain fine-tuned ViT on the same data),
`tiny` (no weights: the demo's small ViT trained from scratch on this data set, 64 px, batch 64,
one lr 5e-4, 8 epochs, sized for a CPU; see also configs/demo.py:root=...), `runlocal` (a smoke
test of the code path, not a model that learns: 20 steps of a random 2-block ViT at 518 px,
batch 8 and the paper's learning rates).

  python -m ifam_jax.main --config configs/waterbirds.py:root=$WB,tiny --workdir /tmp/wb_tiny

Evaluated on 'val' (metadata split 1) and 'test' (split 2). <workdir>/params/best holds the
parameters of the best validation worst-group accuracy and params/final those of the last step;
the reference instead keeps the checkpoint of the best test accuracy. Here worst_group_accuracy
is the minimum over all four (bird, place) groups; the reference's WGA is the minimum over the
two minority groups (landbird/water, waterbird/land), reported as
worst_group_accuracy_minority. Compute is bfloat16 (parameters fp32) where the
reference ran fp32: add --config.model.dtype=float32 for its numerics.
"""

import ml_collections

from ifam_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_recipe_arg(arg)
  c = config_lib.paper_recipe(image_size=518, global_batch_size=128, total_epochs=90,
                              augment='cub_original', presence_group_size=16)
  # At 518 px XLA's merging of dots that share an operand pays: keep its default
  # (docs/performance.md).
  c.gpu_compiler_options.xla_gpu_dot_merger_threshold_mb = 32
  waterbirds = dict(source='waterbirds', root=arg.root)
  c.data.train = dict(waterbirds, split='train')
  c.data.evals = dict(val=dict(waterbirds, split='val'), test=dict(waterbirds, split='test'))
  c.data.val_split = 'val'
  c.data.best_metric = 'worst_group_accuracy'
  return config_lib.apply_common_args(c, arg)
