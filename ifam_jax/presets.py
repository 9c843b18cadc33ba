"""Named variants of an iFAM recipe: the paper's baselines and ablations (iFAM Tabs. 1, 2, 5).

A preset edits a recipe's config in place and reads nothing else, so every variant keeps the
recipe's data, schedule, resolution and learning rates:

  erm                        the fine-tuned ViT (`config_lib.use_baseline`)
  ifam                       the recipe as it is
  late_mask                  iFAM's stage-1 mask, pooled late (stage2_mask='late')
  early_mask_gt              a ViT key-masked by the ground-truth foreground ("Early mask_gt")
  late_mask_gt               a ViT pooled under the ground-truth foreground ("Late mask_gt")
  ifam_no_stage2             PDiscoFormer: no stage-2 loss, stage 1 predicts
  ifam_soft_mask             stage 2 reads the soft mask
  ifam_k1_no_shaping         one part, no part-shaping losses
  ifam_no_stage1_classifier  no stage-1 cross-entropy
  ifam_frozen_stage2         the stage-2 backbone frozen (the reference's --freeze_second_stage)
  ifam_part_dropout_<p>      stage-2 mask part dropout p in {0, 0.1, 0.5} (the recipe has 0.3)
  ifam_straight_through      the stage-2 loss trains stage 1 through the straight-through mask
  ifam_mask_floor            never an empty mask: the best-scoring patches join it
  ifam_mask_erode            the mask's edge patches removed, then the floor
  ifam_fixed_count           stage 2 sees a fixed number of best-scoring patches
  ifam_stage2_patch_dropout  each visible patch hidden from stage 2 at random while training
  ifam_remedies              erosion, the floor and the patch dropout together

  config = get_config(...); presets.apply_preset(config, 'late_mask')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from ifam_jax import config_lib

# The loss terms that shape the parts (PDiscoFormer's), as opposed to the two cross-entropies.
SHAPING_LOSSES = ('presence', 'enforced_presence', 'equivariance', 'orthogonality',
                  'total_variation', 'entropy', 'concentration')


@dataclasses.dataclass(frozen=True)
class Preset:
  """label: a short name for tables; description: one line; apply: edits a config in place."""

  label: str
  description: str
  apply: Callable[[ml_collections.ConfigDict], None]


# ----------------------------------------------------------------------------
# Edits
# ----------------------------------------------------------------------------
def _set_model(**values) -> Callable[[ml_collections.ConfigDict], None]:
  def apply(c: ml_collections.ConfigDict) -> None:
    c.model.update(values)
  return apply


def _ground_truth(kind: str) -> Callable[[ml_collections.ConfigDict], None]:
  def apply(c: ml_collections.ConfigDict) -> None:
    config_lib.use_baseline(c)  # one ViT trained as the ERM row and iFAM's stage 2 are
    c.model.kind = kind
  return apply


def _no_shaping(c: ml_collections.ConfigDict) -> None:
  c.model.num_parts = 1
  for name in SHAPING_LOSSES:
    c.loss.weights[name] = 0.0


def _no_stage1_classifier(c: ml_collections.ConfigDict) -> None:
  c.loss.weights.cls1 = 0.0


def _frozen_stage2(c: ml_collections.ConfigDict) -> None:
  c.optim.groups.stage2_backbone.frozen = True


# The mask remedies' settings (ifam_jax/models/ifam.py, `IFAM`), as fractions of the patches so
# that they carry over from the demo's 8x8 grid, where an object fills at least half of 6-22 % of
# the patches (5th-95th percentile, median 12.5 %: 4-14 patches, median 8), to a 37x37 one
# (518 px). The floor, 5 % (3 of 64, 68 of 1369 patches), stays under the smallest object, so it
# leaves a mask that finds the object as it is and only fills an empty or nearly empty one. The
# fixed count, 10 % (6 of 64, 137 of 1369), sits inside the objects' range. One round of erosion
# removes the ring of edge patches at any resolution (on the 8x8 grid most of a small object: the
# floor then shows its best-scoring patches). Dropout 0.2 hides one or two of a small object's
# patches per step, a fifth of a large one's.
MASK_FLOOR, FIXED_COUNT, PATCH_DROPOUT = 0.05, 0.1, 0.2

PRESETS: dict[str, Preset] = {
    'erm': Preset('ERM', 'the fine-tuned ViT, no stage 1 and no mask', config_lib.use_baseline),
    'ifam': Preset('iFAM', 'the recipe as it is', lambda c: None),
    'late_mask': Preset('Late mask', "iFAM's stage-1 mask applied after the ViT: patch tokens "
                        'averaged under it', _set_model(stage2_mask='late')),
    'early_mask_gt': Preset('Early mask_gt', 'a ViT whose attention sees only the ground-truth '
                            'foreground', _ground_truth('early_mask_gt')),
    'late_mask_gt': Preset('Late mask_gt', 'a ViT whose patch tokens are averaged under the '
                           'ground-truth foreground', _ground_truth('late_mask_gt')),
    'ifam_no_stage2': Preset('No stage 2', 'PDiscoFormer: no stage-2 loss, stage 1 predicts',
                             _set_model(kind='pdiscoformer')),
    'ifam_soft_mask': Preset('Soft mask', 'stage 2 reads the soft foreground probability',
                             _set_model(stage2_mask='soft')),
    'ifam_k1_no_shaping': Preset('K=1 w/o shaping', 'one part and no part-shaping losses',
                                 _no_shaping),
    'ifam_no_stage1_classifier': Preset('No stage-1 classif.', 'no stage-1 cross-entropy',
                                        _no_stage1_classifier),
    'ifam_frozen_stage2': Preset('Frozen stage 2', 'the stage-2 backbone frozen; its head and '
                                 'tokens train', _frozen_stage2),
    **{f'ifam_part_dropout_{p:g}': Preset(f'Part dropout {p:g}', f'stage-2 mask part dropout '
                                          f'{p:g}', _set_model(mask_part_dropout=p))
       for p in (0.0, 0.1, 0.5)},
    'ifam_straight_through': Preset('Straight-through', 'the stage-2 loss trains stage 1 '
                                    'through the straight-through mask',
                                    _set_model(stage2_mask='straight_through')),
    'ifam_mask_floor': Preset('Mask floor', f'the mask never empty: the best-scoring '
                              f'{MASK_FLOOR:g} of the patches join it',
                              _set_model(mask_min_fraction=MASK_FLOOR)),
    'ifam_mask_erode': Preset('Mask erode+floor', "the mask's edge patches removed (one round "
                              f'of erosion), then the {MASK_FLOOR:g} floor',
                              _set_model(mask_erode=1, mask_min_fraction=MASK_FLOOR)),
    'ifam_fixed_count': Preset('Fixed count', f'stage 2 sees exactly the best-scoring '
                               f'{FIXED_COUNT:g} of the patches',
                               _set_model(mask_fixed_fraction=FIXED_COUNT)),
    'ifam_stage2_patch_dropout': Preset('Stage-2 patch dropout',
                                        f'each visible patch hidden from stage 2 with '
                                        f'probability {PATCH_DROPOUT:g} in training',
                                        _set_model(stage2_patch_dropout=PATCH_DROPOUT)),
    'ifam_remedies': Preset('Mask remedies', 'erosion, the floor and the stage-2 patch dropout '
                            'together', _set_model(mask_erode=1, mask_min_fraction=MASK_FLOOR,
                                                   stage2_patch_dropout=PATCH_DROPOUT)),
}


def apply_preset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Applies preset `name` to an iFAM recipe's `config` in place; returns it."""
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; known: {sorted(PRESETS)}')
  if config.model.kind != 'ifam':
    raise ValueError(f'presets are variants of an iFAM recipe; this config has model.kind '
                     f'{config.model.kind!r}')
  PRESETS[name].apply(config)
  return config
