"""The audit's power to fail: a stage 2 that reads masked-out pixels is caught."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifam_jax.evaluators import audit as audit_lib
from ifam_jax.evaluators import loop
from ifam_jax.evaluators import metrics
from test_evaluators_in9 import single_device_batch_sharding


def test_audit_detects_a_stage2_that_reads_masked_out_pixels():
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
  fg_mask = np.zeros((4, 2, 2), np.float32)
  fg_mask[:, 0, 0] = 1  # one of four 4x4 patches kept
  batch_sharding = single_device_batch_sharding()
  batch = {'image': images, 'label': np.zeros(4, np.int32), 'group': np.zeros(4, np.int32),
           'valid': np.array([1, 1, 1, 0], np.int32)}

  def forward(params, frozen, batch, rng):
    del params, frozen, rng
    return {'fg_mask': jnp.asarray(fg_mask), 'patch_mask': jnp.asarray(fg_mask.reshape(4, -1)),
            'kept_fraction': jnp.full(4, 0.25), 'logits': jnp.zeros((4, 3))}

  def audit(stage2):
    step = audit_lib.make_audit_step(forward, jax.jit(stage2))
    outputs = loop.collect_outputs(step, {}, {}, [batch], 1, batch_sharding, seed=0)
    return audit_lib.summarize_audit(outputs, num_images=64)

  def honest(params, frozen, images, patch_mask):  # reads kept patches only
    keep = metrics.upsample_patches(patch_mask.reshape(-1, 2, 2), 8, 8)[..., None]
    return jnp.mean(jnp.where(keep > 0, images, 0).astype(jnp.float32), axis=(1, 2))

  def leaky(params, frozen, images, patch_mask):
    return jnp.mean(images.astype(jnp.float32), axis=(1, 2))

  assert audit(honest) == {'num_images': 3, 'unchanged_noise': 1.0,
                           'unchanged_other_image': 1.0, 'mean_kept_fraction': 0.25,
                           'forward_max_abs_diff': pytest.approx(
                               np.abs(honest(0, 0, images, fg_mask.reshape(4, -1))[:3]).max())}
  leaked = audit(leaky)
  assert leaked['unchanged_noise'] == 0.0 and leaked['unchanged_other_image'] == 0.0
