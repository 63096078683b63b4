"""Pixel decoding with the modality LUT.

(0028,0101) Bits Stored and (0028,0103) Pixel Representation are applied
explicitly (garbage in unused high bits is masked, signed values are sign
extended), then (0028,1053) Rescale Slope and (0028,1052) Rescale Intercept
per slice (or per frame of an enhanced object): they can differ between
slices of one series.

Compressed transfer syntaxes decode through pydicom's plugins (pylibjpeg,
pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls, gdcm). Whether a decoder is
installed is checked *before* decoding, so a missing codec is reported as
``CODEC_MISSING`` for the series rather than as a decode error.

Native (uncompressed) pixel data must hold exactly what (0028,0010) Rows,
(0028,0011) Columns, (0028,0100) Bits Allocated, (0028,0002) Samples per
Pixel and (0028,0008) Number of Frames describe (plus one padding byte to an
even length): pydicom only warns when there is more, and would re-stride or
crop it into a silently wrong image. Header values that are not numbers, and
a modality LUT that is not finite, are ``PIXEL_DECODE_ERROR`` for the series.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from fedimg.dicom.reasons import Reason, RefusedError


def _header_int(ds: Dataset, keyword: str, tag: str, default: int) -> int:
    """An integer header value (``default`` when absent or empty).

    Raises:
        RefusedError: PIXEL_DECODE_ERROR when the value is not an integer.
    """
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RefusedError(Reason.PIXEL_DECODE_ERROR, f"{tag} is not an integer") from None


def _lut_value(value: Any, tag: str, default: float) -> float:
    """A finite (0028,1053) / (0028,1052) value (``default`` when absent or empty).

    Raises:
        RefusedError: PIXEL_DECODE_ERROR when the value is not a finite number.
    """
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RefusedError(Reason.PIXEL_DECODE_ERROR, f"{tag} is not a number") from None
    if not math.isfinite(number):
        raise RefusedError(Reason.PIXEL_DECODE_ERROR, f"{tag} is not a finite number")
    return number


def _check_native_length(ds: Dataset, transfer_syntax: str) -> None:
    """Refuse native pixel data whose length does not match the header.

    The expected length is (0028,0010) Rows x (0028,0011) Columns x
    (0028,0002) Samples per Pixel x (0028,0008) Number of Frames x
    (0028,0100) Bits Allocated / 8 (bit-packed for 1 bit), padded to even.

    Raises:
        RefusedError: PIXEL_DECODE_ERROR when the lengths disagree or the
            header values cannot describe native pixel data.
    """
    from pydicom.uid import UID

    if transfer_syntax and UID(transfer_syntax).is_encapsulated:
        return  # compressed: the codec checks its own frame sizes
    rows = _header_int(ds, "Rows", "(0028,0010) Rows", 0)
    columns = _header_int(ds, "Columns", "(0028,0011) Columns", 0)
    samples = _header_int(ds, "SamplesPerPixel", "(0028,0002) Samples per Pixel", 1)
    frames = _header_int(ds, "NumberOfFrames", "(0028,0008) Number of Frames", 1)
    bits = _header_int(ds, "BitsAllocated", "(0028,0100) Bits Allocated", 0)
    if rows <= 0 or columns <= 0 or samples <= 0 or frames <= 0:
        raise RefusedError(
            Reason.PIXEL_DECODE_ERROR,
            "(0028,0010) Rows, (0028,0011) Columns, (0028,0002) Samples per Pixel and "
            "(0028,0008) Number of Frames must be positive",
        )
    if bits != 1 and (bits <= 0 or bits % 8):
        raise RefusedError(Reason.PIXEL_DECODE_ERROR, f"(0028,0100) Bits Allocated {bits} is not 1 or a multiple of 8")
    n_samples = rows * columns * samples * frames
    expected = (n_samples + 7) // 8 if bits == 1 else n_samples * (bits // 8)
    actual = len(ds.PixelData)
    if actual not in (expected, expected + 1):
        raise RefusedError(
            Reason.PIXEL_DECODE_ERROR,
            f"(7FE0,0010) Pixel Data holds {actual} bytes; (0028,0010) Rows, (0028,0011) Columns, "
            f"(0028,0100) Bits Allocated, (0028,0002) and (0028,0008) imply {expected}",
        )


def _mask_bits(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Keep the (0028,0101) Bits Stored low bits; sign-extend when (0028,0103) is 1.

    Some writers leave garbage (e.g. overlay bits) above Bits Stored; decoders
    do not always clear it, so it is cleared here whatever the decoder did.
    """
    bits_alloc = _header_int(ds, "BitsAllocated", "(0028,0100) Bits Allocated", 16)
    bits_stored = _header_int(ds, "BitsStored", "(0028,0101) Bits Stored", bits_alloc)
    signed = _header_int(ds, "PixelRepresentation", "(0028,0103) Pixel Representation", 0) == 1
    return mask_stored_bits(arr, bits_alloc, bits_stored, signed)


def mask_stored_bits(arr: np.ndarray, bits_alloc: int, bits_stored: int, signed: bool) -> np.ndarray:
    """:func:`_mask_bits` on header values already read: the low ``bits_stored`` bits, sign-extended if ``signed``.

    Returns ``arr`` itself when there is nothing to mask; otherwise a new array of the decoder's width
    ('i' or 'u' by ``signed``; int64 for 64-bit input).
    """
    if not np.issubdtype(arr.dtype, np.integer) or bits_stored >= bits_alloc or bits_stored < 1:
        return arr
    width = arr.dtype.itemsize
    if not arr.dtype.isnative:  # e.g. big-endian pixel data: the bit operations below need native order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if width < 8:
        # In the decoder's own width, with no int64 copy: the low bits of a two's-complement value are
        # those of its unsigned view, and every masked or sign-extended value fits the width
        # (bits_stored < bits_alloc <= 8 * width).
        out = arr.view(f"u{width}") & np.array((1 << bits_stored) - 1, dtype=f"u{width}")
        if signed:
            out = out.view(f"i{width}")
            sign = np.array(1 << (bits_stored - 1), dtype=f"i{width}")
            np.bitwise_xor(out, sign, out=out)
            np.subtract(out, sign, out=out)
        return out
    raw = arr.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        bit = 1 << (bits_stored - 1)
        raw = (raw ^ bit) - bit
    return raw


def check_codec(transfer_syntax: str) -> None:
    """Refuse with ``CODEC_MISSING`` when no installed plugin decodes ``transfer_syntax``.

    Args:
        transfer_syntax: (0002,0010) Transfer Syntax UID.

    Raises:
        RefusedError: CODEC_MISSING, naming what to install.
    """
    if not transfer_syntax:
        return  # no file meta: pydicom assumes an uncompressed syntax
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise RefusedError(
            Reason.CODEC_MISSING, f"no pixel decoder exists for transfer syntax {transfer_syntax}"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        name = uid.name if uid.is_valid else transfer_syntax
        raise RefusedError(
            Reason.CODEC_MISSING, f"no installed decoder for {name} ({transfer_syntax}); install one of: {missing}"
        )


def decode_stored(ds: Dataset) -> np.ndarray:
    """Decode all frames of ``ds`` to masked stored values (no modality LUT).

    Returns:
        integer (or float) array, (rows, columns) for one frame or
        (frames, rows, columns) for several.

    Raises:
        RefusedError: CODEC_MISSING when no installed plugin decodes the
            transfer syntax, UNSUPPORTED_PIXELS for colour data, NO_PIXELS or
            PIXEL_DECODE_ERROR otherwise (including native pixel data longer or
            shorter than the header describes).
    """
    if "PixelData" not in ds:
        raise RefusedError(Reason.NO_PIXELS, "no (7FE0,0010) Pixel Data")
    samples = _header_int(ds, "SamplesPerPixel", "(0028,0002) Samples per Pixel", 1)
    if samples != 1:
        raise RefusedError(
            Reason.UNSUPPORTED_PIXELS, f"(0028,0002) Samples per Pixel is {samples}; only greyscale volumes"
        )
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    check_codec(ts)
    _check_native_length(ds, ts)
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        text = str(exc).lower()
        if "plugin" in text or "handler" in text or "missing" in text:
            raise RefusedError(
                Reason.CODEC_MISSING,
                f"no installed decoder for transfer syntax {ts}; install pylibjpeg and its plugins",
            ) from None
        raise RefusedError(Reason.PIXEL_DECODE_ERROR, f"{type(exc).__name__} decoding {ts}") from None
    except (ValueError, EOFError, OSError) as exc:
        raise RefusedError(
            Reason.PIXEL_DECODE_ERROR,
            f"pixel data could not be decoded ({type(exc).__name__}); the file may be truncated",
        ) from None
    return _mask_bits(np.asarray(arr), ds)


#: Uncompressed little-endian transfer syntaxes, whose pixel bytes lie in the file as they are in memory.
NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})  # implicit, explicit VR
_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class NativePixels:
    """Where one file's uncompressed pixels lie, noted while its header is read (no pixel is read then).

    Only for files :func:`decode_stored` would decode without complaint: one sample per pixel,
    8/16/32-bit (0028,0100), a (7FE0,0010) of the length the header implies, a finite modality
    LUT. :func:`read_native` then reads the pixels by offset, without parsing the file again.

    Attributes:
        offset: byte offset of the (7FE0,0010) value in the file.
        rows, columns, frames: (0028,0010), (0028,0011), (0028,0008).
        bits_allocated, bits_stored: (0028,0100), (0028,0101).
        signed: (0028,0103) Pixel Representation is 1.
        slope, intercept: :func:`rescale` of the file.
        size, mtime_ns: the file's size and modification time when indexed: a file changed
            since is read again in full instead.
    """

    offset: int
    rows: int
    columns: int
    frames: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    size: int
    mtime_ns: int

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data the header implies (without the padding byte)."""
        return self.rows * self.columns * self.frames * self.bits_allocated // 8


def native_pixels(ds: Dataset, st: os.stat_result) -> NativePixels | None:
    """The :class:`NativePixels` of a dataset read with deferred pixel data, or None.

    None (the file is decoded by pydicom, as before) for compressed, big-endian or deflated
    transfer syntaxes, pixel data held in memory (small values are not deferred), float pixel
    data, and any header value :func:`decode_stored` or :func:`rescale` would refuse or treat
    specially: those keep their exact refusal messages.

    Args:
        ds: the dataset, read with ``defer_size`` so that (7FE0,0010) stayed on disk.
        st: ``os.stat`` of the file when ``ds`` was read.
    """
    meta = ds.file_meta
    if meta is None or str(meta.get("TransferSyntaxUID", "")) not in NATIVE_LITTLE_ENDIAN:
        return None
    raw = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    if raw is None or getattr(raw, "value", None) is not None:
        return None
    offset, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if not isinstance(offset, int) or not isinstance(length, int) or length == _UNDEFINED_LENGTH:
        return None
    try:
        samples = _header_int(ds, "SamplesPerPixel", "(0028,0002) Samples per Pixel", 1)
        rows = _header_int(ds, "Rows", "(0028,0010) Rows", 0)
        columns = _header_int(ds, "Columns", "(0028,0011) Columns", 0)
        frames = _header_int(ds, "NumberOfFrames", "(0028,0008) Number of Frames", 1)
        bits = _header_int(ds, "BitsAllocated", "(0028,0100) Bits Allocated", 0)
        bits_stored = _header_int(ds, "BitsStored", "(0028,0101) Bits Stored", 0)
        representation = _header_int(ds, "PixelRepresentation", "(0028,0103) Pixel Representation", -1)
        slope, intercept = rescale(ds)
    except RefusedError:
        return None
    if samples != 1 or rows <= 0 or columns <= 0 or frames <= 0 or bits not in (8, 16, 32):
        return None
    if not 1 <= bits_stored <= bits or representation not in (0, 1):
        return None
    found = NativePixels(
        offset=offset,
        rows=rows,
        columns=columns,
        frames=frames,
        bits_allocated=bits,
        bits_stored=bits_stored,
        signed=representation == 1,
        slope=slope,
        intercept=intercept,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
    )
    if length not in (found.nbytes, found.nbytes + 1) or offset + found.nbytes > st.st_size:
        return None
    return found


def read_native(path: str | os.PathLike[str], px: NativePixels) -> np.ndarray | None:
    """The masked stored values of an uncompressed file, read by offset: what :func:`decode_stored` gives.

    Returns:
        (rows, columns) for one frame, (frames, rows, columns) for several; None when the file is
        no longer the one indexed (its size or modification time changed, or it reads short):
        the caller then decodes it in full.
    """
    shape = (px.rows, px.columns) if px.frames == 1 else (px.frames, px.rows, px.columns)
    arr = np.empty(shape, dtype=f"<{'i' if px.signed else 'u'}{px.bits_allocated // 8}")
    with open(path, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        if st.st_size != px.size or st.st_mtime_ns != px.mtime_ns:
            return None
        fh.seek(px.offset)
        view = memoryview(arr.data).cast("B")
        got = 0
        while got < px.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                return None
            got += n
    return mask_stored_bits(
        arr.astype(arr.dtype.newbyteorder("="), copy=False), px.bits_allocated, px.bits_stored, px.signed
    )


def rescale(ds: Dataset) -> tuple[float, float]:
    """(0028,1053) Rescale Slope and (0028,1052) Rescale Intercept of a single-frame object.

    Absent or empty values mean slope 1 and intercept 0; a slope of 0 is read
    as 1, as dcm2niix does (a zero slope would erase the image).

    Raises:
        RefusedError: PIXEL_DECODE_ERROR when a value is not a finite number
            (e.g. 'abc', NaN, inf): applying it would give a wrong volume.
    """
    slope = _lut_value(ds.get("RescaleSlope"), "(0028,1053) Rescale Slope", 1.0) or 1.0
    intercept = _lut_value(ds.get("RescaleIntercept"), "(0028,1052) Rescale Intercept", 0.0)
    return slope, intercept


def check_modality_lut(slope: float, intercept: float) -> None:
    """Refuse a modality LUT that is not finite.

    Raises:
        RefusedError: PIXEL_DECODE_ERROR when ``slope`` or ``intercept`` is not
            finite (e.g. a per-frame (0028,9145) value that did not parse).
    """
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise RefusedError(
            Reason.PIXEL_DECODE_ERROR,
            "(0028,1053) Rescale Slope / (0028,1052) Rescale Intercept is not a finite number",
        )


def apply_modality_lut(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values to modality values (Hounsfield units for CT), float32.

    Computed in float64 and rounded once to float32. Meant for one slice or
    frame at a time (the float64 step is 4x the bytes of 16-bit stored values).

    Raises:
        RefusedError: PIXEL_DECODE_ERROR when ``slope`` or ``intercept`` is not
            finite (e.g. a per-frame (0028,9145) value that did not parse).
    """
    check_modality_lut(slope, intercept)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def modality_volume(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """:func:`apply_modality_lut` of an (i, j, k) volume, one k-slice at a time (no whole-volume float64 copy).

    Returns:
        float32 (i, j, k) array in Fortran order (each k-slice contiguous, as NIfTI stores it).
    """
    check_modality_lut(slope, intercept)
    out = np.empty(stored.shape, dtype=np.float32, order="F")
    for k in range(stored.shape[2]):
        out[:, :, k] = apply_modality_lut(stored[:, :, k], slope, intercept)
    return out


#: Widest stored-value range whose every value :func:`exactly_scalable` checks one by one.
_MAX_CHECKED_SPAN = 1 << 20


def exactly_scalable(low: int, high: int, slope: float, intercept: float) -> bool:
    """Whether every stored value in ``[low, high]`` maps exactly onto float32 through ``slope`` and ``intercept``.

    True when ``slope`` and ``intercept`` are float32 numbers (NIfTI keeps
    scl_slope / scl_inter as float32) and, for every value ``v`` of the
    range, ``v * slope`` and ``v * slope + intercept`` are float32 numbers.
    Then a reader that applies the scaling in float32 or in float64 gets
    exactly :func:`apply_modality_lut`'s float32 values: storing the integers
    plus the scaling loses nothing. CT's usual slope 1 and intercept -1024
    (and any power-of-two slope) qualify; a slope such as 0.1 does not.
    """
    if np.float32(slope) != slope or np.float32(intercept) != intercept:
        return False
    if high - low >= _MAX_CHECKED_SPAN:
        # Too many values to list: only the identity scaling of float32-exact integers qualifies.
        return slope == 1.0 and intercept == 0.0 and max(abs(low), abs(high)) <= 1 << 24
    values = np.arange(low, high + 1, dtype=np.float64)
    product = values * slope
    result = product + intercept
    return bool(
        np.array_equal(product, product.astype(np.float32)) and np.array_equal(result, result.astype(np.float32))
    )


def decode_slice(ds: Dataset) -> np.ndarray:
    """Decode one single-frame slice to float32 modality values, shape (rows, columns).

    Raises:
        RefusedError: see :func:`decode_stored`.
    """
    arr = decode_stored(ds)
    if arr.ndim != 2:
        raise RefusedError(Reason.UNSUPPORTED_MULTIFRAME, f"expected one frame, decoded shape {list(arr.shape)}")
    return apply_modality_lut(arr, *rescale(ds))


def invert_monochrome1(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values with (0028,0004) MONOCHROME1 turned into MONOCHROME2 order.

    MONOCHROME1 means the lowest value is displayed white: a radiograph
    stored that way has air at the top of the range. Mirroring the stored
    values inside the range that (0028,0101) Bits Stored and (0028,0103)
    Pixel Representation allow (``min + max - value``) makes higher values
    brighter, as for MONOCHROME2, before the modality LUT is applied. Other
    photometric interpretations are returned unchanged.

    Args:
        stored: masked stored values (see :func:`decode_stored`).
        ds: the dataset (its header only is read).

    Raises:
        RefusedError: PIXEL_DECODE_ERROR when a header value is not an integer.
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric != "MONOCHROME1":
        return stored
    bits_alloc = _header_int(ds, "BitsAllocated", "(0028,0100) Bits Allocated", 16)
    bits = _header_int(ds, "BitsStored", "(0028,0101) Bits Stored", bits_alloc)
    if not np.issubdtype(stored.dtype, np.integer) or not 1 <= bits <= 32:
        # Float pixel data has no stored range: mirror around its own extremes.
        arr = stored.astype(np.float64)
        return float(arr.min()) + float(arr.max()) - arr
    signed = _header_int(ds, "PixelRepresentation", "(0028,0103) Pixel Representation", 0) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return (lo + hi) - stored.astype(np.int64)


def read_slice(path: str) -> Dataset:
    """Read a full dataset (with pixels) from disk."""
    return pydicom.dcmread(path)
