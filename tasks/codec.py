"""Image bytes <-> numpy arrays: the one place where the stages decode and encode images.

Arrays are uint8 in RGB(A) order. OpenCV does the work where it is fast and exact (every PNG, a
complete JPEG); PIL where it is the stricter or the defining one (a truncated image raises; a
prior view is composited over white and resized as the training loader always has).
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

_PNG_READ = {"rgb": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE, "rgba": cv2.IMREAD_UNCHANGED}
_TO_RGB = {"rgb": cv2.COLOR_BGR2RGB, "rgba": cv2.COLOR_BGRA2RGBA}


def decode_rgb(data: bytes) -> np.ndarray:
    """A photo (JPEG, PNG, ...) -> RGB [H, W, 3] in stored pixel order (no EXIF rotation:
    annotations use stored pixels).

    OpenCV decodes JPEG about twice as fast as PIL (the same pixels: both are libjpeg-turbo) but
    returns a partial image for a truncated file without an error, so it is trusted only for a
    JPEG that ends with its EOI marker; PIL, which raises on truncation, decides everything else.
    """
    if data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\0\r\n ")[-2:] == b"\xff\xd9":
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr is not None:
            return arr
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on a truncated file, unlike a header read
        return np.asarray(im.convert("RGB"))


def decode_png(data: bytes | None, mode: str = "rgb") -> np.ndarray:
    """PNG bytes -> RGB [H, W, 3] (``mode="rgb"``), grey [H, W] (``"gray"``) or, for a
    four-channel PNG, RGBA [H, W, 4] (``"rgba"``); ValueError when there is no decodable image."""
    if not data:
        raise ValueError("empty PNG bytes")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _PNG_READ[mode])
    if arr is None:
        raise ValueError("not a decodable PNG")
    if mode == "rgba" and (arr.ndim != 3 or arr.shape[2] != 4):
        raise ValueError(f"not an RGBA PNG (decoded shape {arr.shape})")
    return cv2.cvtColor(arr, _TO_RGB[mode]) if mode in _TO_RGB else arr


def decode_view(png: bytes, size: int | None = None) -> np.ndarray:
    """A prior view (PNG RGBA, transparent where no surface) over white, as uint8 [V, V, 3],
    resized to ``size`` when given."""
    im = Image.open(io.BytesIO(png))
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    if size and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im)


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grey or RGB array through PIL (previews, reports, small rows);
    shard payloads use ``encode_png``."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode_png(arr: np.ndarray, level: int) -> bytes:
    """PNG bytes of a grey [H, W] or RGB [H, W, 3] array (OpenCV wants BGR).

    Fixed filters instead of libpng's adaptive choice: the "up" filter suits photo patches and no
    filter suits flat masks; both at a fraction of the adaptive search's cost for similar sizes.
    """
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
        filt = cv2.IMWRITE_PNG_FILTER_UP
    else:
        filt = cv2.IMWRITE_PNG_FILTER_NONE
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_FILTER, filt])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_rgba(rgba: np.ndarray) -> bytes:
    """PNG bytes of an RGBA [H, W, 4] array (a rendered view), fast compression."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
