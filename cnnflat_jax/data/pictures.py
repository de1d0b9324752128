"""Picture files (PNG, JPEG, ...) -> uint8 arrays of a given channel count and size.

One place decodes pictures, so that a folder dataset's training images and
``predict``'s inputs go through the same conversion: grayscale (``L``) or RGB,
16-bit pixels scaled to 0-255, and, where a size is given, a bilinear resize
(Pillow's, which filters on shrinking).
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from cnnflat_jax.errors import Error

# The most pixels a picture may have, checked before it is decoded (8192 x 8192).
MAX_PICTURE_PIXELS = 2**26
_MODES = {1: "L", 3: "RGB"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class UnreadableImageError(Error, ValueError):
    """A file that is not an image, or not one of the size wanted."""


def read_picture(
    file: str | BinaryIO,
    channels: int,
    size: tuple[int, int] | None = None,
    *,
    name: str | None = None,
) -> np.ndarray:
    """The picture in ``file`` as uint8 ``(H, W, channels)``; resized to ``size``
    ``(H, W)`` when given (else its own size).

    Args:
      file: a local file's path, or a file object open for reading bytes.
      channels: 1 (grayscale) or 3 (RGB).
      size: ``(height, width)`` to resize to, or None.
      name: how errors name the file (default ``file``).

    Raises:
      UnreadableImageError: not a picture Pillow reads, truncated, too large,
        or 32-bit pixels, which have no 0-255 scale.
    """
    from PIL import Image

    name = name or str(file)
    try:
        with Image.open(file) as image:
            if image.width * image.height > MAX_PICTURE_PIXELS:
                raise UnreadableImageError(
                    f"{name}: {image.width}x{image.height} pixels, more than the "
                    f"{MAX_PICTURE_PIXELS:,} that are decoded"
                )
            if image.mode in _SIXTEEN_BIT_MODES:  # Scaled to 0-255, not cut.
                wide = np.asarray(image).astype(np.uint32)
                image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
            elif image.mode in ("I", "F"):
                raise UnreadableImageError(
                    f"{name}: {image.mode} pixels (32-bit) have no 0-255 scale; save 8 or 16 bits"
                )
            image = image.convert(_MODES.get(channels, "RGB"))
            if size is not None and (image.height, image.width) != tuple(size):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image)
    except Image.DecompressionBombError as e:
        raise UnreadableImageError(f"{name}: {e}") from None
    except Image.UnidentifiedImageError:  # Its message names the file object.
        raise UnreadableImageError(
            f"{name}: cannot read it as an image: not a picture format Pillow knows"
        ) from None
    except (OSError, ValueError, EOFError, SyntaxError) as e:  # Pillow's ways to say "not this".
        raise UnreadableImageError(f"{name}: cannot read it as an image: {e}") from None
    return array.reshape(*array.shape[:2], channels)
