"""The embedded demo: iFAM vs. the ERM baseline on synthetic spurious-correlation data.

No download, a few minutes on 2 CPU cores. Shapes (the label) on textured backgrounds that agree
with the label in 95% of training images and are balanced at test; both models are tiny ViTs
trained from scratch, so here the stage-1 backbone trains too. Background types share one colour
palette and differ in texture only: a colour cue would also show in the few background pixels
of the patches at the object's edge, which stage 2 does see.

  python -m ifam_jax.main --config configs/demo.py --workdir /tmp/ifam_demo

Arguments (`configs/demo.py:steps=200,baseline`): `steps` caps training, `baseline` trains only
the ERM model, `ifam_only` skips it, `root` trains the same recipe on a folder of one's own
instead of the synthetic data (`config_lib.folder_data`): a Waterbirds-layout folder
(metadata.csv with columns img_filename, y, split, place; images under the folder), else image
folders train/<class>/..., val/<class>/... and optionally test/<class>/...; no weights needed.

  python -m ifam_jax.main --config configs/demo.py:root=/data/my_birds --workdir /tmp/my_birds

`compare` puts iFAM beside every peer that needs no pretrained weights (ifam_jax/compare.py):
late masking, early and late masking with the ground-truth masks, DFR and DAR on the ERM run's
features, A² with the ERM ViT standing in for DINOv2, and the paper's ablations; `seeds=3` runs
seeds 0-2 and reports mean ± std.

  python -m ifam_jax.main --config configs/demo.py:compare,seeds=3 --workdir /tmp/ifam_compare

`variant=NAME` picks one benchmark of the synthetic family (`VARIANTS`: settings of
ifam_jax/data/synthetic.py over the demo's, in every split; the demo's own in brackets):
  texture         the default: background types differ in texture only, colours from one palette
  colour          every type draws its texture from the same set; only its palette tells it apart
  both            each type has its own texture and its own palette
  size_position   radii 10-30% of the side (18-28%), centre up to 20% off the middle (12%)
  correlation_80  background agrees with the label in 80% of training images (95%)
  correlation_99  ... in 99% of training images
  no_object       20% of training images have no object: only their background tells the label
  tied_size       radius from 18-23% on background 0, 23-28% on the other: the area leaks it

  python -m ifam_jax.main --config configs/demo.py:variant=colour,compare,seeds=3 --workdir DIR
"""

from ifam_jax import config_lib

# Each variant's settings of the synthetic source, over the demo's (see the docstring).
VARIANTS = {
    'texture': {},
    'colour': dict(cue='colour'),
    'both': dict(cue='both'),
    'size_position': dict(object_size=(0.1, 0.3), position_jitter=0.2),
    'correlation_80': dict(majority=0.8),
    'correlation_99': dict(majority=0.99),
    'no_object': dict(no_object_fraction=0.2),  # training images only; val and test keep theirs
    'tied_size': dict(size_tied_to_background=True),
}


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, steps=0, baseline=False, ifam_only=False, compare=False,
                             seeds=1, variant='texture', root='')
  if arg.variant not in VARIANTS:
    raise ValueError(f'unknown demo variant {arg.variant!r}; known: {list(VARIANTS)}')
  if arg.root and arg.variant != 'texture':
    raise ValueError(f'variant={arg.variant} picks synthetic data and root= a folder of your '
                     'own; pass one of them')
  c = config_lib.base_config()
  c.seed = 0
  config_lib.tiny_from_scratch(c)  # a 3-block ViT at 64 px, every group at lr 5e-4
  c.max_steps = arg.steps
  # iFAM against ERM (ifam_jax/compare.py) on the test split, in <workdir>/{ifam,erm}/seed_0.
  c.compare.methods = () if arg.baseline or arg.ifam_only else ('ifam', 'erm')
  c.compare.split = 'test'

  synthetic = dict(source='synthetic', image_size=64, seed=0, num_classes=2, majority=0.95,
                   object_size=(0.18, 0.28), cue='texture')
  synthetic.update(VARIANTS[arg.variant])
  c.data.train = dict(synthetic, num_examples=4096, split='train')
  c.data.evals = dict(val=dict(synthetic, num_examples=512, split='val'),
                      test=dict(synthetic, num_examples=1024, split='test'))
  c.data.val_split = 'val'
  c.data.best_metric = 'worst_group_accuracy'
  c.data.augment = 'none'
  c.data.num_workers = 0
  c.data.eval_batch_size = 256
  if arg.root:
    config_lib.folder_data(c, arg.root)

  c.log_every_steps = 25
  c.eval_every_epochs = 2.0
  c.checkpoint_every_steps = 100
  if arg.compare:
    # A folder of one's own has no ground-truth masks.
    c.compare.methods = tuple(m for m in COMPARE_METHODS if not (arg.root and m.endswith('_gt')))
    c.compare.seeds = tuple(range(arg.seeds))
    c.peers.a2.crop_sizes = (24,)  # about A²'s 64 px crop in a 224 px image, at 64 px
  if arg.baseline:
    config_lib.use_baseline(c)
  return c


# Every method that needs no pretrained weights; the demo's data carries ground-truth masks.
COMPARE_METHODS = ('erm', 'ifam', 'late_mask', 'early_mask_gt', 'late_mask_gt', 'dfr', 'dar',
                   'a2', 'ifam_no_stage2', 'ifam_soft_mask', 'ifam_k1_no_shaping',
                   'ifam_no_stage1_classifier', 'ifam_frozen_stage2', 'ifam_part_dropout_0',
                   'ifam_part_dropout_0.1', 'ifam_part_dropout_0.5', 'ifam_straight_through')
