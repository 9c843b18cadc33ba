"""Frozen extractors and one ordered pass over a split: what the post-hoc peers fit on.

An extractor is a trained or pretrained ViT seen through one function of normalised images:
  'erm'     a trained ERM run: the head's input (fc_norm of the CLS token) and the final patches
  'ifam'    a trained iFAM run's stage 2: the same, computed under stage 1's mask, and the visible
            patches only (`token_mask`)
  'dinov2'  pretrained DINOv2 weights (`model.init_weights`): the final-normed CLS and patches
`run_split` runs any such function over a source and returns host arrays in the source's
order; `cached` keeps them in an .npz so that a rerun reads them back.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from ifam_jax import factory, sharding, weights
from ifam_jax.data.pipeline import normalize
from ifam_jax.evaluators import loop
from ifam_jax.models import ifam, vit

EXTRACTORS = ('erm', 'ifam', 'dinov2')
FeatureFn = Callable[[nnx.Module, jax.Array], dict[str, jax.Array]]


# ----------------------------------------------------------------------------
# Extractors
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Extractor:
  """A frozen model, the ViT inside it, and a description for tables."""

  kind: str
  model: nnx.Module
  backbone: vit.VisionTransformer
  description: str

  def features(self, model: nnx.Module, x: jax.Array) -> dict[str, jax.Array]:
    """'features' [B, D] fp32 (what a linear head reads), 'tokens' [B, N, D] fp16 (half the
    host memory of a split's patch tokens), 'token_mask' [B, N]."""
    if self.kind == 'dinov2':
      out = model(x)
      mask = jnp.ones(out['patches'].shape[:2], bool)
      return {'features': out['cls'].astype(jnp.float32),
              'tokens': out['patches'].astype(jnp.float16), 'token_mask': mask}
    patch_mask, mode = None, 'hard'
    if self.kind == 'ifam':
      fg_mask = model(x, train=False).fg_mask
      patch_mask, mode = fg_mask.reshape(x.shape[0], -1), model.stage2_mask
      model = model.stage2
    out = model.backbone(x, patch_mask, mask_mode=mode)
    features = model.fc_norm(out['cls'].astype(jnp.float32))
    mask = (jnp.ones(out['patches'].shape[:2], bool) if patch_mask is None
            else patch_mask > 0)
    return {'features': features, 'tokens': out['patches'].astype(jnp.float16),
            'token_mask': mask}


def describe_backbone(model_cfg: ml_collections.ConfigDict) -> str:
  """'B/14 DINOv2 @518', 'S/8 w64 d3 scratch @64': the ViT and resolution of a config."""
  overrides = dict(model_cfg.vit_overrides)
  shape = ''.join(f' {k[0]}{overrides[k]}' for k in ('width', 'depth') if k in overrides)
  init = 'DINOv2' if model_cfg.init_weights else 'scratch'
  return f'{model_cfg.variant}{shape} {init} @{model_cfg.image_size}'


def load_extractor(kind: str, config: ml_collections.ConfigDict, run_dir: epath.Path | None,
                   which: str) -> Extractor:
  """The frozen extractor `kind` of `EXTRACTORS`.

  'erm' and 'ifam' read the run in `run_dir` (trained with `config`); 'dinov2' builds the
  configured ViT with `config.model.init_weights`.
  """
  if kind not in EXTRACTORS:
    raise ValueError(f'peers.extractor must be one of {EXTRACTORS}, got {kind!r}')
  backbone_text = describe_backbone(config.model)
  if kind == 'dinov2':
    if not config.model.init_weights:
      raise ValueError("peers.extractor='dinov2' needs DINOv2 weights (model.init_weights, the "
                       "recipe's weights=...)")
    model = vit.VisionTransformer(factory.vit_from_config(config.model), rngs=nnx.Rngs(0))
    weights.load_dinov2(model, config.model.init_weights)
    return Extractor(kind, model, model, f'DINOv2 {backbone_text}, frozen')
  model = factory.load_model(config, run_dir, which)
  if kind == 'ifam' and not isinstance(model, ifam.IFAM):
    raise ValueError(f'peers.extractor=ifam needs an iFAM run; {run_dir} holds a '
                     f'{type(model).__name__}')
  backbone = model.stage2.backbone if kind == 'ifam' else model.backbone
  what = "iFAM's stage 2" if kind == 'ifam' else 'ERM'
  return Extractor(kind, model, backbone, f'{what} ({backbone_text}), frozen')


# ----------------------------------------------------------------------------
# One pass over a split
# ----------------------------------------------------------------------------
def run_split(fn: FeatureFn, model: nnx.Module, source: Any, transform: Any,
              config: ml_collections.ConfigDict,
              inputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """`fn(model, normalised images, **per-example inputs)` over `source`: host arrays in the
  source's order, with each example's 'label', 'group' and 'valid' (0: undecodable image).

  `inputs` are per-example arrays in the same order (e.g. cached attention maps), handed to `fn`
  batch by batch. A single process runs this (then the eval loop's order is the source's); the
  peers fit on one host's arrays anyway.
  """
  if jax.process_count() > 1:
    raise NotImplementedError('the post-hoc peers run in a single process')
  mesh = sharding.make_mesh(config.mesh)
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.replicated(mesh))
  inputs = inputs or {}

  @jax.jit
  def step(state, unused, batch, rng):
    del unused, rng
    merged = nnx.merge(graphdef, state)
    return fn(merged, normalize(batch['image'], **vit.pixel_stats(merged)),
              **{k: batch[k] for k in inputs})

  dataset, num_batches = loop.eval_dataset(source, transform, config)
  size = config.data.eval_batch_size

  def batches():
    for i, batch in zip(range(num_batches), dataset):
      yield {**batch, **{k: _padded(v[i * size:(i + 1) * size], size) for k, v in inputs.items()}}

  merged = loop.collect_outputs(step, state, None, batches(), num_batches,
                                sharding.batch_sharding(mesh), config.seed)
  return {k: v[:len(source)] for k, v in merged.items()}


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
  """The last eval batch is padded; so are the per-example inputs that go with it."""
  if len(rows) == size:
    return rows
  return np.concatenate([rows, np.zeros((size - len(rows),) + rows.shape[1:], rows.dtype)])


def cached(path: epath.Path, compute: Callable[[], dict[str, np.ndarray]]
           ) -> dict[str, np.ndarray]:
  """The arrays saved at `path` (.npz), else `compute()`'s, saved there first."""
  if path.exists():
    with path.open('rb') as f:
      return dict(np.load(f))
  arrays = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  partial = path.parent / (path.name + '.partial')
  partial.write_bytes(buffer.getvalue())
  partial.replace(path)
  return arrays
