"""LLaVA-NeXT any-resolution tiling for the continuous (ViT) branch of UniToken, model-free.

An image of original size (W, H) reaches the ViT as `1 + max_tiles` square tiles of side S
(`vit_tiles`): tile 0 is the whole image resized to S x S (the base), then the image is
resized, keeping its aspect, into the best (w, h) pinpoint (`select_best_resolution`), padded
black around the centre (`resize_and_pad`) and cut into R = h / S rows and C = w / S columns
of tiles, row-major; unused tiles are 0. The ViT turns each tile into s x s tokens
(s = tokens_per_side, T = s^2 per tile, F = (1 + max_tiles) T feature rows per image).

What enters the LLM (`continuous_slots`), as in UniToken's modeling_xllmx_chameleon_anyres:
the T base tokens, row-major; then, if a grid was chosen, the grid's (R s) x (C s) token
plane with the rows and columns that only cover padding removed (`unpadded_grid`, LLaVA-NeXT
unpad_image arithmetic), each kept row followed by an end-of-row text token (`EOR_SLOT`).
With no pinpoints (base tile only) the base tokens are followed by one end-of-row token.
Token (y, x) of the grid plane is feature row (1 + (y // s) C + x // s) T + (y % s) s + x % s.

Resizing is PIL bicubic (antialiased when shrinking): it is what the authors' PIL
`Image.resize` calls do by default for RGB images, and what the rest of unimm_jax.data uses,
so base and grid tiles match their preprocessing. Pixels are normalised to [-1, 1], SigLIP's
mean = std = 0.5, so black padding is -1 as in the authors' pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image

from unimm_jax.data.transforms import normalize

# A continuous slot entry that is not a feature row but the end-of-row text token.
EOR_SLOT = -1


@dataclasses.dataclass(frozen=True)
class AnyRes:
  """The continuous branch's tiling (module docstring).

  tile_size: S, the ViT's input side in pixels (384 at paper size).
  tokens_per_side: s, ViT tokens per tile side (27 = 384 // 14 for SigLIP-SO400M/14).
  grid_pinpoints: the (w, h) candidates in pixels, each a multiple of S; () = base tile only.
  """

  tile_size: int
  tokens_per_side: int
  grid_pinpoints: tuple[tuple[int, int], ...] = ()

  def __post_init__(self):
    # Configs give lists; the dataclass is frozen and hashable only with tuples.
    object.__setattr__(self, 'grid_pinpoints',
                       tuple((int(w), int(h)) for w, h in self.grid_pinpoints))
    if self.tile_size <= 0 or self.tokens_per_side <= 0:
      raise ValueError(f'AnyRes tile_size and tokens_per_side must be > 0, got '
                       f'{self.tile_size}, {self.tokens_per_side}')
    for w, h in self.grid_pinpoints:
      if w <= 0 or h <= 0 or w % self.tile_size or h % self.tile_size:
        raise ValueError(f'AnyRes grid pinpoint {(w, h)} must be positive multiples of the '
                         f'tile size {self.tile_size}')

  @property
  def max_tiles(self) -> int:
    """Most grid tiles any pinpoint needs; 0 without pinpoints."""
    return max((w * h // self.tile_size**2 for w, h in self.grid_pinpoints), default=0)

  @property
  def tokens_per_tile(self) -> int:
    """T = tokens_per_side ** 2."""
    return self.tokens_per_side**2

  @property
  def features_per_image(self) -> int:
    """F = (1 + max_tiles) * T feature rows per image (base tile first)."""
    return (1 + self.max_tiles) * self.tokens_per_tile


def select_best_resolution(original_wh: tuple[int, int],
                           pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The (w, h) of `pinpoints` that keeps most of an image of size `original_wh` (W, H).

  LLaVA-NeXT's rule: with s = min(w / W, h / H), maximise the effective resolution
  min(int(W s) * int(H s), W * H), then minimise the wasted area w * h - effective; on a
  full tie the first pinpoint wins.
  """
  width, height = original_wh
  if not pinpoints:
    raise ValueError('select_best_resolution needs at least one pinpoint')
  best, best_effective, best_waste = None, 0, math.inf
  for w, h in pinpoints:
    scale = min(w / width, h / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    waste = w * h - effective
    if effective > best_effective or (effective == best_effective and waste < best_waste):
      best, best_effective, best_waste = (w, h), effective, waste
  return best


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
  """PIL bicubic resize of uint8 (H, W, 3) to (height, width, 3)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def resize_and_pad(image: np.ndarray, target_wh: tuple[int, int]) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (h, w, 3): resized keeping aspect into `target_wh` = (w, h),
  centred on black.

  The side with the smaller scale fills the target; the other is ceil(side * scale), capped
  at the target (the authors' resize_and_pad_image arithmetic).
  """
  height, width = image.shape[:2]
  target_w, target_h = target_wh
  scale_w, scale_h = target_w / width, target_h / height
  if scale_w < scale_h:
    new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
  else:
    new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
  canvas = np.zeros((target_h, target_w, 3), np.uint8)
  top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
  canvas[top:top + new_h, left:left + new_w] = _resize(image, new_w, new_h)
  return canvas


def grid_shape(original_wh: tuple[int, int], anyres: AnyRes) -> tuple[int, int]:
  """(rows R, columns C) of tiles of the best pinpoint for `original_wh`; (0, 0) without
  pinpoints."""
  if not anyres.grid_pinpoints:
    return 0, 0
  w, h = select_best_resolution(original_wh, anyres.grid_pinpoints)
  return h // anyres.tile_size, w // anyres.tile_size


def vit_tiles(image: np.ndarray, anyres: AnyRes) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (1 + max_tiles, S, S, 3) in [-1, 1].

  Tile 0 is the image resized to S x S; tiles 1 .. R C the best pinpoint's grid, row-major;
  the rest 0.
  """
  size = anyres.tile_size
  tiles = np.zeros((1 + anyres.max_tiles, size, size, 3), np.float32)
  tiles[0] = normalize(_resize(image, size, size))
  rows, cols = grid_shape((image.shape[1], image.shape[0]), anyres)
  if rows:
    padded = resize_and_pad(image, (cols * size, rows * size))
    grid = padded.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4)
    tiles[1:1 + rows * cols] = normalize(grid.reshape(rows * cols, size, size, 3))
  return tiles


def unpadded_grid(original_wh: tuple[int, int], grid_rows: int, grid_cols: int,
                  tokens_per_side: int) -> tuple[range, range]:
  """(token rows, token columns) of the (R s) x (C s) grid plane that survive the unpad.

  LLaVA-NeXT's unpad_image, integer for integer: if W / H > (C s) / (R s) the image fills
  the width, its height there is int(H * (C s) / W) and padding = ((R s) - that) // 2 rows
  are cut at each end ([padding, R s - padding) kept, one row more than the image when the
  difference is odd); otherwise the same on the columns.
  """
  current_h, current_w = grid_rows * tokens_per_side, grid_cols * tokens_per_side
  width, height = original_wh
  if width / height > current_w / current_h:
    new_h = int(height * (current_w / width))
    padding = (current_h - new_h) // 2
    return range(padding, current_h - padding), range(current_w)
  new_w = int(width * (current_h / height))
  padding = (current_w - new_w) // 2
  return range(current_h), range(padding, current_w - padding)


def continuous_slots(original_wh: tuple[int, int], anyres: AnyRes) -> list[int]:
  """The continuous part of one image's span (module docstring), in sequence order.

  Each entry is a feature row index f in [0, F) of the image's ViT features, or `EOR_SLOT`
  for an end-of-row text token. Its length depends on `original_wh` (W, H) through the
  chosen grid and the unpad.
  """
  side, per_tile = anyres.tokens_per_side, anyres.tokens_per_tile
  slots = list(range(per_tile))
  rows, cols = grid_shape(original_wh, anyres)
  if not rows:
    return slots + [EOR_SLOT]
  kept_rows, kept_cols = unpadded_grid(original_wh, rows, cols, side)
  for y in kept_rows:
    for x in kept_cols:
      tile = 1 + (y // side) * cols + x // side
      slots.append(tile * per_tile + (y % side) * side + x % side)
    slots.append(EOR_SLOT)
  return slots
