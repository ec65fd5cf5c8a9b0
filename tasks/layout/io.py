"""Reading ``pics layout``'s inputs: element images (silhouette from alpha, else non-white pixels)
and the target mask. Bad input raises :class:`LayoutInputError` naming the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
WHITE_LEVEL = 250  # a pixel with every channel at or above this is background on an image without alpha


class LayoutInputError(ValueError):
    """An unusable input to ``pics layout`` (or ``pics composite --layout auto``); names the file."""


def element_files(paths: list[str | Path]) -> list[Path]:
    """Files and folders (their images, sorted by name) -> element image files, in order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise LayoutInputError(f"--elements {p}: folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise LayoutInputError(f"--elements {p}: no such file or folder")
    if not out:
        raise LayoutInputError("--elements: no element given")
    return out


def open_image(path: str | Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise LayoutInputError(f"{what} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LayoutInputError(f"{what} {path}: cannot read the image ({e})") from None


def silhouette(im: Image.Image, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mask bool [h, w], rgb uint8 [h, w, 3]): the alpha channel where the image has a used one,
    else the pixels that are not white (objects on white, as decompose cuts them)."""
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    rgba = np.asarray(im.convert("RGBA"))
    rgb = rgba[..., :3]
    if has_alpha and rgba[..., 3].min() < 255:
        mask = rgba[..., 3] >= 128
    else:
        mask = (rgb < WHITE_LEVEL).any(-1)
    if not mask.any():
        raise LayoutInputError(f"{name}: empty silhouette (fully transparent or all white)")
    return mask, np.ascontiguousarray(rgb)


def read_element(path: str | Path, what: str = "--elements") -> tuple[np.ndarray, np.ndarray]:
    return silhouette(open_image(path, what), f"{what} {path}")


def read_target(path: str | Path) -> np.ndarray:
    """The target mask -> bool [H, W]: its alpha where it has a used one, else pixels >= 128 (white inside)."""
    im = open_image(path, "--target")
    rgba = np.asarray(im.convert("RGBA"))
    alpha = rgba[..., 3]
    mask = alpha >= 128 if alpha.min() < 255 else np.asarray(im.convert("L")) >= 128
    if not mask.any():
        raise LayoutInputError(f"--target {path}: empty mask (no pixel >= 128; the target is white on black)")
    return mask
