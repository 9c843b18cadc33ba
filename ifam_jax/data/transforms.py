"""Worker-side image transforms: decode, augment, and emit a fixed uint8 [size, size, 3] image.

They run in grain workers on PIL images and draw every random number from the
`np.random.Generator` they are given, so an augmentation is a pure function of the record and
its generator (the pipeline seeds that from seed, epoch and index). A transform is a callable
`(image, mask, rng) -> (image, mask)`: geometric steps move the optional foreground mask with
nearest sampling and fill 0, so the mask stays aligned with its image. Normalisation is left to
the device (`pipeline.normalize`), which keeps host-to-device transfers uint8. A record's CUB
part annotations ('keypoints', 'box') follow its image through `resize_center_crop` only
(`_ResizeCenterCrop.points`, the reference's part-eval arithmetic).

Recipes (reference section 6.7):
  imagenet_train      timm RandomResizedCrop + hflip + RandAugment rand-m6-mstd0.5
  cub_original_train  CUB / Waterbirds / MetaShift: resize, flips, PlanckianJitter, RandomAffine,
                      RandomCrop
  resize_center_crop  eval: resize the shorter side, centre crop
  imagenet_eval       timm eval: resize to size / 0.875 bicubic, centre crop (squash at >= 384)
  siim_acr            SIIM-ACR: squash to size x size as cv2 does, hflip in training
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from absl import logging
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}

# Planckian-locus illuminants, 'blackbody' mode: the (r, g, b) rows of Zini et al. 2022, as in the
# reference's utils/data_utils/planckian_color_jitter.py and kornia's RandomPlanckianJitter.
BLACKBODY = np.array([
    [0.6743, 0.4029, 0.0013], [0.6281, 0.4241, 0.1665], [0.5919, 0.4372, 0.2513],
    [0.5623, 0.4457, 0.3154], [0.5376, 0.4515, 0.3672], [0.5163, 0.4555, 0.4103],
    [0.4979, 0.4584, 0.4468], [0.4816, 0.4604, 0.4782], [0.4672, 0.4619, 0.5053],
    [0.4542, 0.4630, 0.5289], [0.4426, 0.4638, 0.5497], [0.4320, 0.4644, 0.5681],
    [0.4223, 0.4648, 0.5844], [0.4135, 0.4651, 0.5990], [0.4054, 0.4653, 0.6121],
    [0.3980, 0.4654, 0.6239], [0.3911, 0.4655, 0.6346], [0.3847, 0.4656, 0.6444],
    [0.3787, 0.4656, 0.6532], [0.3732, 0.4656, 0.6613], [0.3680, 0.4655, 0.6688],
    [0.3632, 0.4655, 0.6756], [0.3586, 0.4655, 0.6820], [0.3544, 0.4654, 0.6878],
    [0.3503, 0.4653, 0.6933],
])

Mask = Image.Image | None


class Transform(Protocol):
  """Maps a decoded RGB image (and its optional mask) to an image of exactly [size, size]."""

  size: int

  def __call__(self, image: Image.Image, mask: Mask,
               rng: np.random.Generator) -> tuple[Image.Image, Mask]:
    ...


# ----------------------------------------------------------------------------
# Decoding and the per-record entry point
# ----------------------------------------------------------------------------
# Unreadable files this process has warned about: each is named once, not once per epoch.
_WARNED: set[str] = set()


def _to_8_bits(img: Image.Image) -> Image.Image:
  """Single-band images of more than 8 bits -> 'L'; PIL's own conversion clips them at 255.

  16-bit images ('I;16*': 16-bit PNGs and TIFFs) map 0..65535 to 0..255. 32-bit integer ('I')
  and float ('F') images use the same 16-bit range when their values lie within it, as 16-bit
  files decoded to 'I' do; floats within [0, 1] map to 0..255; any other image stretches its
  own min..max to 0..255. Non-finite values make the image unreadable.
  """
  if not img.mode.startswith(('I', 'F')):
    return img
  x = np.asarray(img, np.float64)
  if not np.isfinite(x).all():
    raise ValueError(f'{img.mode} image holds non-finite values')
  lo, hi = float(x.min()), float(x.max())
  if img.mode == 'F' and 0 <= lo and hi <= 1:
    lo, hi = 0.0, 1.0
  elif 0 <= lo and hi <= 65535:
    lo, hi = 0.0, 65535.0
  x = np.round((x - lo) * (255 / max(hi - lo, 1e-12)))
  return Image.fromarray(x.astype(np.uint8), 'L')


def decode(image: bytes | np.ndarray, name: str = '') -> Image.Image | None:
  """Encoded bytes or a uint8 [H, W(, C)] array -> an RGB PIL image; None if unreadable.

  PIL picks the format from the bytes, so CMYK JPEGs, PNGs, greyscale and 16-bit images
  (`_to_8_bits`) all come out RGB. A corrupt file must not kill a long run: it is reported as
  None, with a warning naming it (`name`, e.g. its path) once per process.
  """
  buffer = None if isinstance(image, np.ndarray) else io.BytesIO(image)
  try:
    if buffer is None:
      img = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    else:
      img = Image.open(buffer)
    return _to_8_bits(img).convert('RGB')  # forces the full decode: truncated files fail here
  except Exception as e:  # pylint: disable=broad-except  # decoders raise many error types
    if name not in _WARNED:  # a nameless record is never added: each one is reported
      if name:
        _WARNED.add(name)
      reason = str(e).replace(f' {buffer!r}', '')  # PIL names the in-memory buffer, not the file
      logging.warning('unreadable image %s (%s: %s); it is skipped (a black image with valid=0)',
                      name or '(in-memory record)', type(e).__name__, reason)
    return None


def process(record: dict[str, Any], rng: np.random.Generator,
            transform: Transform) -> dict[str, np.ndarray]:
  """A raw source record -> fixed-shape arrays: image uint8 [S, S, 3], label/group/valid int32.

  `valid` is 0 for an undecodable image (then image and mask are zeros) or when the record
  arrives with valid=0 (eval padding); `fg_mask` uint8 [S, S] is passed through when present.
  'keypoints' float32 [P, 3] (x, y, visible) and 'box' float32 [4] (x, y, w, h), when present,
  are moved as the image is (`_ResizeCenterCrop.points`; all invisible for an undecodable image).
  The record's optional 'path' names the file in the warning about an undecodable image.
  """
  size = transform.size
  image = decode(record['image'], record.get('path', ''))
  keypoints = record.get('keypoints')
  if keypoints is not None and not hasattr(transform, 'points'):
    raise ValueError(f'records with part annotations need the resize + centre-crop eval '
                     f'transform (transforms.resize_center_crop); {transform!r} cannot move them')
  out_points = None if keypoints is None else (np.zeros_like(keypoints, np.float32),
                                               np.zeros(4, np.float32))
  mask = record.get('fg_mask')
  valid = image is not None and bool(record.get('valid', 1))
  out_mask = None if mask is None else np.zeros((size, size), np.uint8)
  if image is None:
    out_image = np.zeros((size, size, 3), np.uint8)
  else:
    pil_mask = None if mask is None else Image.fromarray(np.asarray(mask, np.uint8))
    if pil_mask is not None and pil_mask.size != image.size:
      raise ValueError(f'fg_mask size {pil_mask.size} differs from image size {image.size}')
    if keypoints is not None:
      out_points = transform.points(keypoints, record['box'], image.size)
    image, pil_mask = transform(image, pil_mask, rng)
    out_image = np.asarray(image, np.uint8)
    if pil_mask is not None:
      out_mask = np.asarray(pil_mask, np.uint8)
  if out_image.shape != (size, size, 3):
    raise ValueError(f'{transform!r} produced shape {out_image.shape}, not {(size, size, 3)}')
  out = {'image': out_image, 'label': np.int32(record['label']),
         'group': np.int32(record['group']), 'valid': np.int32(valid)}
  if out_mask is not None:
    out['fg_mask'] = out_mask
  if out_points is not None:
    out['keypoints'], out['box'] = out_points
  return out


# ----------------------------------------------------------------------------
# Geometric primitives (image and mask together)
# ----------------------------------------------------------------------------
def _both(image: Image.Image, mask: Mask,
          op: Callable[[Image.Image, bool], Image.Image]) -> tuple[Image.Image, Mask]:
  """Applies `op(img, is_mask)` to the image and, when present, to the mask."""
  return op(image, False), (None if mask is None else op(mask, True))


def _shorter_side_size(w: int, h: int, size: int) -> tuple[int, int]:
  """torchvision Resize(int)'s (width, height): the shorter side becomes `size`, the longer
  int(size * ratio)."""
  return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def _resize_shorter(image: Image.Image, mask: Mask, size: int,
                    resample: int) -> tuple[Image.Image, Mask]:
  """torchvision Resize(int) of the image and its mask (`_shorter_side_size`)."""
  wh = _shorter_side_size(*image.size, size)
  return _both(image, mask, lambda im, m: im.resize(wh, Image.NEAREST if m else resample))


def _center_crop_offsets(w: int, h: int, size: int) -> tuple[int, int]:
  """(left, top) of torchvision's CenterCrop(size) of a w x h image no smaller than size."""
  return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def _crop(image: Image.Image, mask: Mask, left: int, top: int,
          width: int, height: int) -> tuple[Image.Image, Mask]:
  box = (left, top, left + width, top + height)
  return _both(image, mask, lambda im, _: im.crop(box))


def _center_crop(image: Image.Image, mask: Mask, size: int) -> tuple[Image.Image, Mask]:
  return _crop(image, mask, *_center_crop_offsets(*image.size, size), size, size)


def inverse_affine_matrix(center: tuple[float, float], angle: float,
                          translate: tuple[float, float], scale: float) -> tuple[float, ...]:
  """PIL's AFFINE data (output -> input pixel map) of torchvision's affine without shear.

  The forward map rotates by `angle` degrees clockwise on screen about `center`, scales, then
  translates; PIL needs its inverse: x_in = R^-1 (x_out - center - t) / scale + center.
  """
  rot = math.radians(angle)
  cx, cy = center
  tx, ty = translate
  m = [math.cos(rot) / scale, math.sin(rot) / scale, 0.0,
       -math.sin(rot) / scale, math.cos(rot) / scale, 0.0]
  m[2] = m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
  m[5] = m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
  return tuple(m)


def affine(image: Image.Image, angle: float, translate: tuple[float, float], scale: float,
           resample: int = Image.NEAREST, fill: int | tuple[int, ...] = 0) -> Image.Image:
  """torchvision F.affine on a PIL image (centre (w/2, h/2), no shear)."""
  w, h = image.size
  data = inverse_affine_matrix((w * 0.5, h * 0.5), angle, translate, scale)
  return image.transform(image.size, Image.AFFINE, data, resample, fillcolor=fill)


# ----------------------------------------------------------------------------
# Colour: PlanckianJitter
# ----------------------------------------------------------------------------
def planckian_jitter(image: np.ndarray, index: int) -> np.ndarray:
  """Re-lights a uint8 RGB image with blackbody illuminant `index`, as the reference does.

  R *= r/g and B *= b/g in [0, 1], clipped above at 1, then truncated (not rounded) to uint8.
  """
  r, g, b = BLACKBODY[index]
  x = np.asarray(image, np.float64) / 255
  x[..., 0] = x[..., 0] * (r / g)
  x[..., 2] = x[..., 2] * (b / g)
  return (np.minimum(x, 1.0) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# RandAugment (timm rand-mM-mstdS, PIL ops)
# ----------------------------------------------------------------------------
def _solarize_add(image: Image.Image, add: int) -> Image.Image:
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return image.point(lut * 3)


# level in [0, 1] (magnitude / 10) -> the op applied to the image only.
_COLOUR_OPS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    'AutoContrast': lambda im, _: ImageOps.autocontrast(im),
    'Equalize': lambda im, _: ImageOps.equalize(im),
    'Invert': lambda im, _: ImageOps.invert(im),
    'Posterize': lambda im, lv: ImageOps.posterize(im, int(lv * 4)),
    'Solarize': lambda im, lv: ImageOps.solarize(im, int(lv * 256)),
    'SolarizeAdd': lambda im, lv: _solarize_add(im, int(lv * 110)),
    'Color': lambda im, lv: ImageEnhance.Color(im).enhance(lv * 1.8 + 0.1),
    'Contrast': lambda im, lv: ImageEnhance.Contrast(im).enhance(lv * 1.8 + 0.1),
    'Brightness': lambda im, lv: ImageEnhance.Brightness(im).enhance(lv * 1.8 + 0.1),
    'Sharpness': lambda im, lv: ImageEnhance.Sharpness(im).enhance(lv * 1.8 + 0.1),
}
# level, sign, (w, h) -> PIL AFFINE data; timm's shear up to 0.3 and translate up to 45 %.
_AFFINE_OPS: dict[str, Callable[[float, float, tuple[int, int]], tuple[float, ...]]] = {
    'ShearX': lambda lv, s, wh: (1, s * lv * 0.3, 0, 0, 1, 0),
    'ShearY': lambda lv, s, wh: (1, 0, 0, s * lv * 0.3, 1, 0),
    'TranslateXRel': lambda lv, s, wh: (1, 0, s * lv * 0.45 * wh[0], 0, 1, 0),
    'TranslateYRel': lambda lv, s, wh: (1, 0, 0, 0, 1, s * lv * 0.45 * wh[1]),
}
RAND_AUGMENT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                    'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
                    'ShearY', 'TranslateXRel', 'TranslateYRel')


def rand_augment(image: Image.Image, mask: Mask, rng: np.random.Generator, *, num_ops: int = 2,
                 magnitude: float = 6.0, magnitude_std: float = 0.5,
                 fill: tuple[int, int, int] = (124, 116, 104),
                 resample: int = Image.BICUBIC) -> tuple[Image.Image, Mask]:
  """timm's RandAugment: `num_ops` ops drawn with replacement from its 15-op set, each applied
  with probability 0.5 at magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10].

  Signed ops (Rotate up to 30 degrees, shears, translations) flip sign with probability 0.5;
  geometric ops fill with `fill` (the mean colour) and also move the mask.
  """
  for name in (RAND_AUGMENT_OPS[i] for i in rng.integers(len(RAND_AUGMENT_OPS), size=num_ops)):
    if rng.random() > 0.5:
      continue
    m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
    level = min(max(m, 0.0), 10.0) / 10.0
    if name in _COLOUR_OPS:
      image = _COLOUR_OPS[name](image, level)
      continue
    sign = -1.0 if rng.random() > 0.5 else 1.0
    if name == 'Rotate':
      image, mask = _both(image, mask, lambda im, mk: im.rotate(
          sign * level * 30.0, Image.NEAREST if mk else resample, fillcolor=0 if mk else fill))
    else:
      data = _AFFINE_OPS[name](level, sign, image.size)
      image, mask = _both(image, mask, lambda im, mk: im.transform(
          im.size, Image.AFFINE, data, Image.NEAREST if mk else resample,
          fillcolor=0 if mk else fill))
  return image, mask


# ----------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------
def _random_resized_crop_box(w: int, h: int, rng: np.random.Generator,
                             scale: tuple[float, float],
                             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """timm RandomResizedCropAndInterpolation.get_params -> (left, top, width, height)."""
  area = w * h
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if cw <= w and ch <= h:
      return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
  in_ratio = w / h  # fallback: the largest central crop within the ratio range
  if in_ratio < min(ratio):
    cw, ch = w, int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    cw, ch = int(round(h * max(ratio))), h
  else:
    cw, ch = w, h
  return (w - cw) // 2, (h - ch) // 2, cw, ch


@dataclasses.dataclass(frozen=True)
class _ImagenetTrain:
  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: float = 0.5
  num_ops: int = 2
  magnitude: float = 6.0
  magnitude_std: float = 0.5

  def __call__(self, image: Image.Image, mask: Mask,
               rng: np.random.Generator) -> tuple[Image.Image, Mask]:
    left, top, w, h = _random_resized_crop_box(*image.size, rng, self.scale, self.ratio)
    image, mask = _crop(image, mask, left, top, w, h)
    wh = (self.size, self.size)
    image, mask = _both(image, mask,
                        lambda im, m: im.resize(wh, Image.NEAREST if m else Image.BICUBIC))
    if rng.random() < self.hflip:
      image, mask = _both(image, mask, lambda im, _: im.transpose(Image.FLIP_LEFT_RIGHT))
    fill = tuple(min(255, round(255 * c)) for c in IMAGENET_MEAN)
    return rand_augment(image, mask, rng, num_ops=self.num_ops, magnitude=self.magnitude,
                        magnitude_std=self.magnitude_std, fill=fill)


@dataclasses.dataclass(frozen=True)
class _CubOriginalTrain:
  size: int
  hflip: float = 0.5
  vflip: float = 0.0
  planckian_p: float = 0.8
  degrees: float = 90.0
  translate: tuple[float, float] = (0.2, 0.2)
  scale: tuple[float, float] = (0.8, 1.2)

  def __call__(self, image: Image.Image, mask: Mask,
               rng: np.random.Generator) -> tuple[Image.Image, Mask]:
    image, mask = _resize_shorter(image, mask, self.size, Image.BILINEAR)
    if rng.random() < self.hflip:
      image, mask = _both(image, mask, lambda im, _: im.transpose(Image.FLIP_LEFT_RIGHT))
    if rng.random() < self.vflip:
      image, mask = _both(image, mask, lambda im, _: im.transpose(Image.FLIP_TOP_BOTTOM))
    if rng.random() < self.planckian_p:
      image = Image.fromarray(planckian_jitter(np.asarray(image), rng.integers(len(BLACKBODY))))
    w, h = image.size
    angle = rng.uniform(-self.degrees, self.degrees)
    tx = int(round(rng.uniform(-1.0, 1.0) * self.translate[0] * w))
    ty = int(round(rng.uniform(-1.0, 1.0) * self.translate[1] * h))
    scale = rng.uniform(*self.scale)
    image, mask = _both(image, mask, lambda im, _: affine(im, angle, (tx, ty), scale))
    left = int(rng.integers(0, w - self.size + 1))
    top = int(rng.integers(0, h - self.size + 1))
    return _crop(image, mask, left, top, self.size, self.size)


@dataclasses.dataclass(frozen=True)
class _ResizeCenterCrop:
  size: int
  crop_pct: float = 1.0
  method: str = 'bilinear'
  squash: bool = False

  def __call__(self, image: Image.Image, mask: Mask,
               rng: np.random.Generator) -> tuple[Image.Image, Mask]:
    del rng  # deterministic
    resample = _RESAMPLE[self.method]
    if self.squash:
      wh = (self.size, self.size)
      return _both(image, mask, lambda im, m: im.resize(wh, Image.NEAREST if m else resample))
    image, mask = _resize_shorter(image, mask, int(self.size / self.crop_pct), resample)
    return _center_crop(image, mask, self.size)

  def points(self, keypoints: np.ndarray, box: np.ndarray,
             image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """CUB keypoints [P, 3] (x, y, visible) and box [4] (x, y, w, h) of a `image_size` (w, h)
    image -> where this transform puts them, float32, as the reference's part evals do.

    Visible keypoints and the box scale by resize / shorter side (the reference's factor, not
    the rounded resized size), then shift by the crop offset; a keypoint that leaves the crop
    (x or y < 0 or > size) becomes invisible, and keypoints and the box corner are clamped to
    [0, size]; the box keeps its scaled width and height. Invisible keypoints stay as given.
    """
    if self.squash:
      raise ValueError(f'{self!r} squashes the image: part annotations follow a resize of the '
                       'shorter side and a centre crop only')
    resize = int(self.size / self.crop_pct)
    w, h = image_size
    factor = resize / min(w, h)
    left, top = _center_crop_offsets(*_shorter_side_size(w, h, resize), self.size)
    offset = np.array([left, top], np.float64)
    kp = np.array(keypoints, np.float64)
    visible = kp[:, 2] != 0
    xy = kp[visible, :2] * factor - offset
    kp[visible, 2] = np.where(((xy < 0) | (xy > self.size)).any(-1), 0.0, kp[visible, 2])
    kp[visible, :2] = np.clip(xy, 0, self.size)
    out_box = np.array(box, np.float64) * factor
    out_box[:2] = np.clip(out_box[:2] - offset, 0, self.size)
    return kp.astype(np.float32), out_box.astype(np.float32)


def _linear_taps(out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """cv2 INTER_LINEAR's source taps along one axis: half-pixel centres, clamped at the edges."""
  src = np.clip((np.arange(out) + 0.5) * (size / out) - 0.5, 0, size - 1)
  low = np.floor(src).astype(np.int64)
  return low, np.minimum(low + 1, size - 1), (src - low).astype(np.float32)


def resize_like_cv2(image: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
  """cv2.resize of a uint8 [H, W(, C)] array, which albumentations' Resize calls: INTER_LINEAR
  for images (no antialiasing, unlike PIL's; in float32, then rounded: within 1 of cv2's
  fixed-point result) and INTER_NEAREST (source index floor(i * scale)) for masks."""
  if nearest:
    rows = np.minimum((np.arange(height) * image.shape[0]) // height, image.shape[0] - 1)
    cols = np.minimum((np.arange(width) * image.shape[1]) // width, image.shape[1] - 1)
    return image[rows][:, cols]
  lo, hi, f = _linear_taps(height, image.shape[0])
  low = image[lo].astype(np.float32)
  x = low + (image[hi] - low) * f.reshape(-1, *[1] * (image.ndim - 1))
  lo, hi, f = _linear_taps(width, image.shape[1])
  low = x[:, lo]
  x = low + (x[:, hi] - low) * f.reshape(1, -1, *[1] * (image.ndim - 2))
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class _SiimAcr:
  size: int
  hflip: float = 0.0

  def __call__(self, image: Image.Image, mask: Mask,
               rng: np.random.Generator) -> tuple[Image.Image, Mask]:
    x = np.asarray(image)
    grey = (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()
    if grey:  # a chest X-ray replicated to RGB: one channel costs a third
      x = np.repeat(resize_like_cv2(x[..., 0], self.size, self.size, False)[..., None], 3, -1)
    else:
      x = resize_like_cv2(x, self.size, self.size, False)
    image = Image.fromarray(x)
    if mask is not None:
      mask = Image.fromarray(resize_like_cv2(np.asarray(mask), self.size, self.size, True))
    if self.hflip and rng.random() < self.hflip:
      image, mask = _both(image, mask, lambda im, _: im.transpose(Image.FLIP_LEFT_RIGHT))
    return image, mask


def imagenet_train(size: int, *, magnitude: float = 6.0, magnitude_std: float = 0.5,
                   num_ops: int = 2) -> Transform:
  """timm ImageNet train: RandomResizedCrop((0.08, 1), (3/4, 4/3), bicubic), hflip 0.5, then
  RandAugment rand-m6-mstd0.5 over timm's full 15-op set (`RAND_AUGMENT_OPS`), fill = mean."""
  return _ImagenetTrain(size, magnitude=magnitude, magnitude_std=magnitude_std, num_ops=num_ops)


def cub_original_train(size: int, *, vflip: float = 0.0) -> Transform:
  """Reference `cub_original`: Resize(size, bilinear, antialias), hflip 0.5, vflip, Planckian
  jitter ('blackbody', p=0.8), RandomAffine(90, (0.2, 0.2), (0.8, 1.2), NEAREST, fill 0),
  RandomCrop(size)."""
  return _CubOriginalTrain(size, vflip=vflip)


def resize_center_crop(size: int, crop_pct: float = 1.0, method: str = 'bilinear') -> Transform:
  """Eval: the shorter side becomes int(size / crop_pct), then a centre crop of `size`.

  crop_pct 1 with bilinear is the reference test transform for CUB, Waterbirds and MetaShift.
  """
  if method not in _RESAMPLE:
    raise ValueError(f'unknown resize method {method!r}; expected one of {list(_RESAMPLE)}')
  if not 0.0 < crop_pct <= 1.0:
    raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
  return _ResizeCenterCrop(size, crop_pct, method)


def imagenet_eval(size: int) -> Transform:
  """timm ImageNet eval: resize to int(size / 0.875) bicubic + centre crop; at size >= 384 the
  reference squashes the whole image to (size, size) instead."""
  if size >= 384:
    return _ResizeCenterCrop(size, method='bicubic', squash=True)
  return _ResizeCenterCrop(size, 0.875, 'bicubic')


def siim_acr(size: int, train: bool) -> Transform:
  """Reference `siim_acr` (albumentations): Resize(size, size), squashing the whole image, and in
  training HorizontalFlip(0.5). Grey arrives replicated to RGB (`decode`); normalisation
  (CXR mean 0.48865 and std 0.24621 on every channel) is the device's (`model.pixel_mean`)."""
  return _SiimAcr(size, 0.5 if train else 0.0)
