"""A²: crops around a small ViT's attention peaks, embedded by a second ViT, concatenated.

  attention map [B, g, g] --upsample--> [B, S, S] --greedy_crops--> boxes [B, n, 3]
    --crop_resize--> [B, n, out, out, 3] --embed_fn--> [B*n, D] --> z [B, n*D]

The attention map comes from `attention.patch_map(attention.cls_attention(...))` or from any
other source (an oracle mask in tests); `embed_fn` is any batched embedding, A²'s being the
final-normed CLS of a frozen ViT (docs/peers.md). A logistic regression on z is A²_LR.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from ifam_jax.peers import attention
from ifam_jax.peers import crops as crops_lib

EmbedFn = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------
def concat_embeddings(embed_fn: EmbedFn, crops: jax.Array) -> jax.Array:
  """Embeds crops [B, n, o, o, C] in one batch of B*n and concatenates: [B, n*D] (A² Eq. 1).

  z[:, k*D:(k+1)*D] is crop k+1's embedding, so z[:, :D] is the largest crop's.
  """
  if crops.ndim != 5:
    raise ValueError(f'crops must be [B, n, o, o, C], got shape {crops.shape}')
  b, n = crops.shape[:2]
  emb = embed_fn(crops.reshape((b * n,) + crops.shape[2:]))
  if emb.ndim != 2 or emb.shape[0] != b * n:
    raise ValueError(f'embed_fn must map {b * n} crops to [{b * n}, D], got shape {emb.shape}')
  return emb.reshape(b, n * emb.shape[1])


def a2_features(images: jax.Array, attention_maps: jax.Array, embed_fn: EmbedFn, *,
                sizes: Sequence[int], out: int, tie_break: str = 'first',
                method: str = 'bilinear') -> tuple[jax.Array, jax.Array]:
  """A²'s features of images [B, S, S, C]: (z [B, n*D], boxes int32 [B, n, 3]).

  The maps are upsampled to S and the crops cut from these same S x S images (docs/peers.md:
  crops of the input image, not of the original one).

  Args:
    images: the input images [B, S, S, C], in whatever form `embed_fn` wants its crops.
    attention_maps: [B, g, g] patch maps (`attention.patch_map`), or any [B, S', S'] map.
    embed_fn: [B*n, out, out, C] -> [B*n, D].
    sizes: crop sides in pixels of the S x S image, non-increasing (A²_LR on Waterbirds: (64,)).
    out: side the crops are resized to before embedding (A²: 224).
    tie_break: `crops.greedy_crops`'s rule, 'first' by default (docs/peers.md).
    method: `crops.crop_resize`'s interpolation, 'bilinear' by default (docs/peers.md).
  """
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f'images must be [B, S, S, C], got shape {images.shape}')
  if attention_maps.ndim != 3 or attention_maps.shape[0] != images.shape[0]:
    raise ValueError(f'attention_maps must be [{images.shape[0]}, g, g] for {images.shape[0]} '
                     f'images, got shape {attention_maps.shape}')
  side = images.shape[1]
  boxes = crops_lib.greedy_crops(attention.upsample(attention_maps, side), sizes, tie_break)
  cut = crops_lib.crop_resize(images, boxes, sizes, out, method)
  return concat_embeddings(embed_fn, cut), boxes
