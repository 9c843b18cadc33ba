"""Input pipelines: random-access sources, worker-side transforms, grain datasets.

  src = sources.WaterbirdsSource(root, 'train')
  ds = pipeline.make_dataset(src, transform=transforms.cub_original_train(518),
                             global_batch_size=128, seed=0, train=True, num_workers=8)
  for batch in ds:                       # numpy, per process
    x = normalize(global_batch(batch, sharding)['image'])   # on device
"""

from ifam_jax.data import pipeline, siim_acr, sources, synthetic, transforms
from ifam_jax.data.pipeline import (check_image_size, global_batch, make_dataset, normalize,
                                    num_eval_batches, per_process_batch_size)
from ifam_jax.data.siim_acr import SiimAcrSource
from ifam_jax.data.sources import (CubSource, ImageFolderSource, ImageNet9Source,
                                   MetaShiftSource, TfdsSource, WaterbirdsSource)
from ifam_jax.data.synthetic import SyntheticSpuriousSource
from ifam_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    'pipeline', 'siim_acr', 'sources', 'synthetic', 'transforms', 'check_image_size',
    'global_batch', 'make_dataset',
    'normalize', 'num_eval_batches', 'per_process_batch_size', 'CubSource', 'ImageFolderSource',
    'ImageNet9Source', 'MetaShiftSource', 'SiimAcrSource', 'SyntheticSpuriousSource', 'TfdsSource',
    'WaterbirdsSource', 'IMAGENET_MEAN', 'IMAGENET_STD',
]
