"""MetaShift cat/dog (reference 6.6, 7.3): 224 px, batch 128 (4 GPUs x 32), lr 2.828e-6, 90 epochs.

  MS=/data/MetaDatasetCatDog W=/models/vit_base_patch14_reg4_dinov2.lvd142m.safetensors
  python -m ifam_jax.main --config configs/metashift.py:root=$MS,weights=$W --workdir /tmp/ms
  python -m ifam_jax.main --config configs/metashift.py:root=$MS,weights=$W,baseline \
      --workdir /tmp/ms_erm

`root` holds `train/{cat,dog}/<context>/` and `test/{cat,dog}/<context>/` (the DISC subset).
Arguments: `num_parts=K` (default 1; the paper reports K = 1, 2, 4, 8), `baseline` (the ERM
row), `tiny` (no weights: the demo's small ViT trained from scratch on MetaShift, 64 px, batch
64, one lr 5e-4, 8 epochs, sized for a CPU), `runlocal` (a smoke test of the code path, not a
model that learns: 20 steps of a random 2-block ViT at 224 px, batch 8 and the paper's learning
rates).

MetaShift has no validation split, so nothing selects a "best" checkpoint: report
<workdir>/params/final (the reference picks its checkpoint on test accuracy). The test set holds
one context per class (cat(shelf), dog(shelf)), so worst_group_accuracy is the minimum
per-class accuracy, the reference's WGA. Compute is bfloat16 (parameters fp32) where the
reference ran fp32: add --config.model.dtype=float32 for its numerics.
"""

import ml_collections

from ifam_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_recipe_arg(arg)
  c = config_lib.paper_recipe(image_size=224, global_batch_size=128, total_epochs=90,
                              augment='cub_original', presence_group_size=32)
  c.data.train = dict(source='metashift', root=arg.root, split='train')
  c.data.evals = dict(test=dict(source='metashift', root=arg.root, split='test'))
  c.data.val_split = ''
  return config_lib.apply_common_args(c, arg)
