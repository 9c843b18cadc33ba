"""The one way to run a model: merge its parameters, normalise uint8 images, call it.

Jitted code never holds a module: `optim.split_frozen` splits one into (graphdef, params,
frozen, rest), the arrays travel through jit and `apply` puts the model back together inside.
Training, evaluation, the benchmark and the pictures all call it, so a model sees the same
normalised input everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from ifam_jax.data.pipeline import normalize
from ifam_jax.models.vit import pixel_stats


def apply(graphdef: nnx.GraphDef, rest: nnx.State, params: Any, frozen: Any, images: Any,
          fn: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
  """`fn(model, normalised images, **kwargs)`, by default `model(images, **kwargs)`.

  Args:
    graphdef, rest: the static half of the split model.
    params, frozen: its trainable and frozen parameters.
    images: uint8 [B, H, W, 3]; normalised here in float32 with the backbone's mean and std
      (`vit.pixel_stats`: ImageNet's unless the config sets `model.pixel_mean` / `pixel_std`).
    fn: what to run on the merged model, e.g. a method's `predict` or `loss_terms`.
  """
  model = nnx.merge(graphdef, params, frozen, rest)
  x = normalize(images, **pixel_stats(model))
  return model(x, **kwargs) if fn is None else fn(model, x, **kwargs)
