"""Pixel decoding with the modality LUT, one slice at a time.

(0028,0101) Bits Stored and (0028,0103) Pixel Representation are applied
explicitly (garbage in unused high bits is masked, signed values are sign
extended), then (0028,1053) Rescale Slope and (0028,1052) Rescale Intercept
per slice: they can differ between slices of one series.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from fedimg.dicom.reasons import Reason, RefusedError


def _mask_bits(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    bits_alloc = int(ds.get("BitsAllocated", 16))
    if not np.issubdtype(arr.dtype, np.integer) or bits_stored >= bits_alloc:
        return arr
    raw = arr.astype(np.int64) & ((1 << bits_stored) - 1)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        sign = 1 << (bits_stored - 1)
        raw = (raw ^ sign) - sign
    return raw


def decode_slice(ds: Dataset) -> np.ndarray:
    """Decode one single-frame slice to float32 modality values, shape (rows, columns).

    Raises:
        RefusedError: CODEC_MISSING when no installed plugin decodes the
            transfer syntax, UNSUPPORTED_PIXELS for colour data, NO_PIXELS or
            PIXEL_DECODE_ERROR otherwise.
    """
    if "PixelData" not in ds:
        raise RefusedError(Reason.NO_PIXELS, "no (7FE0,0010) Pixel Data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise RefusedError(Reason.UNSUPPORTED_PIXELS,
                           f"(0028,0002) Samples per Pixel is {ds.SamplesPerPixel}; only greyscale volumes")
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        text = str(exc).lower()
        if "plugin" in text or "handler" in text or "decod" in text or "missing" in text:
            raise RefusedError(Reason.CODEC_MISSING,
                               f"no installed decoder for transfer syntax {ts}; install pylibjpeg "
                               "and its plugins") from None
        raise RefusedError(Reason.PIXEL_DECODE_ERROR, f"{type(exc).__name__} decoding {ts}") from None
    except (ValueError, EOFError, OSError) as exc:
        raise RefusedError(Reason.PIXEL_DECODE_ERROR,
                           f"pixel data could not be decoded ({type(exc).__name__}); the file may be truncated") from None
    arr = _mask_bits(np.asarray(arr), ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (arr.astype(np.float64) * slope + intercept).astype(np.float32)


def read_slice(path: str) -> Dataset:
    """Read a full dataset (with pixels) from disk."""
    return pydicom.dcmread(path)
