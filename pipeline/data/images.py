"""Image folders: listing (one subfolder per class, or flat), decoding with Pillow, and
torchvision's Resize / CenterCrop geometry, for images and for float arrays alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import PreprocessConfig, TensorSpec
from ..errors import DataError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")


@dataclass
class ImageFiles:
    """An image folder, listed but not decoded."""

    root: Path
    files: list[Path]
    y: Optional[np.ndarray]
    classes: Optional[list[str]]

    def __len__(self) -> int:
        return len(self.files)


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def list_image_folder(location: Optional[str], key: str) -> ImageFiles:
    if not location:
        raise DataError(f"data.source is 'image_folder' but {key} is not set; point it at a folder of images")
    root = Path(location)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found ({key})")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    subdirs = [p for p in entries if p.is_dir()]
    flat = [p for p in entries if _is_image(p)]
    exts = ", ".join(IMAGE_EXTENSIONS)
    if subdirs and flat:
        raise DataError(f"{root}: holds both images ({flat[0].name}, ...) and subfolders ({subdirs[0].name}, ...); "
                        "use one subfolder per class, or only images (no labels)")
    if flat:
        return ImageFiles(root, flat, None, None)
    files: list[Path] = []
    labels: list[int] = []
    classes = [d.name for d in subdirs]
    for label, d in enumerate(subdirs):
        found = sorted(p for p in d.rglob("*") if _is_image(p) and not any(
            part.startswith(".") for part in p.relative_to(d).parts))
        if not found:
            raise DataError(f"{d}: class folder '{d.name}' holds no images ({exts}); remove it or add images")
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{root}: no images found (looked for {exts}, directly or in class subfolders)")
    return ImageFiles(root, files, np.asarray(labels, np.int64), classes)


def image_geometry(spec: TensorSpec, p: PreprocessConfig, what: str) -> tuple[int, int, int]:
    """(channels, height, width) of one sample, from the model's input shape and layout."""
    if len(spec.shape) != 3 or not all(isinstance(d, int) for d in spec.shape):
        raise DataError(f"{what}: images need a fixed 3-D shape for input '{spec.name}' (C, H, W or H, W, C), "
                        f"got {list(spec.shape)}")
    if p.layout == "nchw":
        c, h, w = spec.shape
    else:
        h, w, c = spec.shape
    return int(c), int(h), int(w)


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes ``shorter``, the other scales (truncated)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's centre-crop box (left, top, right, bottom)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def decode_sample(source: Any, path: Any, spec: TensorSpec, p: PreprocessConfig) -> np.ndarray:
    """One image (a path, or a file object read from `path`) -> the model's sample: decoded,
    resized and centre-cropped, channel order, normalization and layout applied."""
    from .preprocess import normalize

    channels, height, width = image_geometry(spec, p, f"input '{spec.name}'")
    img = decode_image(source, channels, p, name=path)
    if img.shape[:2] != (height, width):
        raise DataError(
            f"{path}: image is {img.shape[1]}x{img.shape[0]} after preprocessing (resize={p.resize}, "
            f"center_crop={p.center_crop}), the model's input '{spec.name}' expects {width}x{height}; "
            "set data.preprocess.resize/center_crop or fix the input's shape")
    if p.channel_order == "bgr":
        img = img[:, :, ::-1]
    img = normalize(img, p, -1)
    return (img.transpose(2, 0, 1) if p.layout == "nchw" else img).astype(spec.dtype, copy=False)


def decode_image(path: Any, channels: int, p: PreprocessConfig, name: Any = None) -> np.ndarray:
    """One image file (or file object; `name` then says which file) -> float32 HWC array after
    channel handling, resize and centre crop."""
    from PIL import Image

    path_for_errors = path if name is None else name
    try:
        with Image.open(path) as im:
            im.load()
            img = im
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode == "1":
                img = img.convert("L")
            elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.convert("F")
            native = len(img.getbands())
            if native == 1 and channels == 3:
                img = img.convert("RGB")  # grayscale replicated into R, G, B
            elif native != channels:
                raise DataError(f"{path_for_errors}: image has {native} channel(s) (mode {im.mode}), the model input expects "
                                f"{channels}; convert the images or fix the input's shape in the config")
            if p.resize:
                img = img.resize(resized_size(img.width, img.height, p.resize), Image.BILINEAR)
            if p.center_crop:
                if p.center_crop > min(img.width, img.height):
                    raise DataError(f"{path_for_errors}: image is {img.width}x{img.height} (after resize={p.resize}), smaller "
                                    f"than data.preprocess.center_crop={p.center_crop}; set resize >= center_crop")
                img = img.crop(crop_box(img.width, img.height, p.center_crop))
            arr = np.asarray(img, dtype=np.float32)
    except DataError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise DataError(f"{path_for_errors}: cannot decode image ({type(e).__name__}: {str(e)[:200]})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def resize_crop_array(hwc: np.ndarray, p: PreprocessConfig) -> np.ndarray:
    """The image resize and centre crop for one float HWC array (per channel, PIL mode F)."""
    from PIL import Image

    out = hwc
    if p.resize:
        h, w = out.shape[:2]
        size = resized_size(w, h, p.resize)
        out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(out[:, :, c], np.float32))
                                   .resize(size, Image.BILINEAR)) for c in range(out.shape[2])], axis=2)
    if p.center_crop:
        h, w = out.shape[:2]
        if p.center_crop > min(h, w):
            raise DataError(f"samples are {w}x{h} (after resize={p.resize}), smaller than "
                            f"data.preprocess.center_crop={p.center_crop}; set resize >= center_crop")
        left, top, right, bottom = crop_box(w, h, p.center_crop)
        out = out[top:bottom, left:right]
    return out
