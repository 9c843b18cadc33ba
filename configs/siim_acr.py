"""SIIM-ACR pneumothorax (reference 6.6, 7.5; paper Tab. 2b): 518 px, K=8, batch 128, lr 2.828e-6,
90 epochs, no enforced-presence loss.

  python -m ifam_jax.data.prepare_siim_acr --source /data/siim --tubes cxr_tube_dict.pkl \
      --out /data/siim_ifam
  W=/models/rad-dino   # microsoft/rad-dino: config.json + model.safetensors
  python -m ifam_jax.main --config configs/siim_acr.py:root=/data/siim_ifam,weights=$W \
      --workdir /tmp/siim
  python -m ifam_jax.main --config configs/siim_acr.py:root=/data/siim_ifam,weights=$W,baseline \
      --workdir /tmp/siim_erm

`root` is the prepared folder ({train_set, full_test_set, robust_test_set,
non_robust_test_set}/{0,1}/<id>.dcm and all_masks/<id>.png; pydicom: pip install -e ".[siim]");
`weights` the RAD-DINO folder or its safetensors file (its config.json is checked).
Arguments: `num_parts=K` (default 8, the paper's), `baseline` (the ERM row), `tiny` (no weights:
the demo's small ViT trained from scratch on this data set, 64 px, batch 64, one lr 5e-4, 8
epochs, sized for a CPU), `runlocal` (a smoke test of the code path, not a model that learns: 20
steps of a random 2-block ViT at 518 px, batch 8 and the paper's learning rates).

  python -m ifam_jax.main --config configs/siim_acr.py:root=/data/siim_ifam,tiny \
      --workdir /tmp/siim_tiny

Evaluated on 'full_test' (its `auroc` is the paper's AUC), 'robust_test' (negatives with a chest
tube and positives without: its `auroc` is the paper's worst-group AUC, which every test split
also reports as `worst_group_auroc`, the AUROC over those two groups) and 'non_robust_test'. The
fg IoU is against the pneumothorax masks, over the positive images (a negative's mask is empty).
Nothing selects a "best" checkpoint (the reference picks the best test accuracy): report
params/final. Images are squashed to 518 x 518 (cv2 bilinear), flipped in training, and
normalised with RAD-DINO's mean and std 0.48865 / 0.24621 on every channel, as the reference.
Compute is bfloat16 (parameters fp32) where the reference ran fp32: add
--config.model.dtype=float32 for its numerics.
"""

import ml_collections

from ifam_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_recipe_arg(arg, num_parts=8)
  c = config_lib.paper_recipe(image_size=518, global_batch_size=128, total_epochs=90,
                              augment='siim_acr', presence_group_size=16)
  # At 518 px XLA's merging of dots that share an operand pays: keep its default
  # (docs/performance.md).
  c.gpu_compiler_options.xla_gpu_dot_merger_threshold_mb = 32
  # The reference's backbone (`--model_arch microsoft/rad-dino --use_hf_transformers`, reference
  # 1.6): an HF Dinov2 ViT-B/14 without registers, its position embedding interpolated as HF
  # does, inputs normalised with the CXR mean and std on every channel.
  config_lib.use_rad_dino(c)
  # Paper App. A and the reference's command (`--enforced_presence_loss 0`): SIIM-ACR trains
  # without the enforced-presence (background) loss L_p0.
  c.loss.weights.enforced_presence = 0.0
  siim = dict(source='siim_acr', root=arg.root)
  c.data.train = dict(siim, split='train')
  c.data.evals = {name: dict(siim, split=name)
                  for name in ('full_test', 'robust_test', 'non_robust_test')}
  c.data.val_split = ''
  c.compare.split = 'full_test'
  return config_lib.apply_common_args(c, arg)
