"""Site-local pictures of a case: radiological orientation, three planes through the lesion, legend, no identifier."""

from __future__ import annotations

import numpy as np
import pytest

from fedimg.tasks.pictures import CONVENTION, case_picture, focus, radiological_slice, to_ras


def test_radiological_display_puts_the_patients_right_on_the_images_left():
    # A RAS volume: axis 0 runs to the patient's right, axis 1 to anterior, axis 2 to superior.
    vol = np.zeros((5, 6, 7))
    vol[4, 5, 3] = 1  # right, anterior
    axial = radiological_slice(vol, "axial", 3)
    assert axial.shape == (6, 5) and axial[0, 0] == 1  # top-left: anterior up, patient's right on the left
    vol[:] = 0
    vol[4, 2, 6] = 1  # right, superior
    coronal = radiological_slice(vol, "coronal", 2)
    assert coronal.shape == (7, 5) and coronal[0, 0] == 1
    vol[:] = 0
    vol[1, 5, 6] = 1  # anterior, superior
    sagittal = radiological_slice(vol, "sagittal", 1)
    assert sagittal.shape == (7, 6) and sagittal[0, 0] == 1  # anterior on the left, superior up


def test_volumes_stored_in_other_axis_orders_are_shown_alike():
    rng = np.random.default_rng(0)
    vol = rng.random((5, 6, 7))
    spacing = (1.0, 2.0, 3.0)
    lps, lps_spacing = vol[::-1, ::-1], spacing  # the same patient stored L-P-S
    back, sp = to_ras(lps, "LPS", lps_spacing)
    assert np.array_equal(back, vol) and sp == spacing
    asr = np.transpose(vol, (1, 2, 0))  # stored A-S-R: axes permuted, spacing with them
    back, sp = to_ras(asr, "ASR", (2.0, 3.0, 1.0))
    assert np.array_equal(back, vol) and sp == spacing
    with pytest.raises(ValueError, match="one of L/R, A/P and S/I each"):
        to_ras(vol, "RRS", spacing)


def _phantom():
    """RAS: an organ on the patient's right, a lesion inside it; the prediction shifted by one voxel."""
    shape = (40, 32, 24)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    image = np.full(shape, 0.2, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    organ = ((grid[0] - 28) / 8) ** 2 + ((grid[1] - 18) / 7) ** 2 + ((grid[2] - 12) / 6) ** 2 < 1
    lesion = ((grid[0] - 30) ** 2 + (grid[1] - 20) ** 2 + (grid[2] - 14) ** 2) < 5
    label[organ], label[lesion] = 1, 2
    image[organ], image[lesion] = 0.6, 0.9
    return image, label, np.roll(label, 1, axis=0)


def test_the_slices_cross_at_the_lesion_or_the_organ_when_there_is_no_lesion():
    _, label, pred = _phantom()
    centre, cls = focus(label, pred)
    assert cls == 2 and label[centre] == 2
    assert np.allclose(centre, np.argwhere(label == 2).mean(axis=0), atol=1)
    no_lesion = np.where(label == 2, 1, label)
    centre, cls = focus(no_lesion, no_lesion)
    assert cls == 1 and no_lesion[centre] == 1
    empty = np.zeros_like(label)
    assert focus(empty, empty) == ((20, 16, 12), None)


def test_one_picture_three_planes_class_colours_legend_and_only_the_case_index(monkeypatch):
    from matplotlib.figure import Figure

    from fedimg.tasks.pictures import COLOURS

    texts, legends = [], []
    orig_text, orig_legend = Figure.text, Figure.legend

    def text(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return orig_text(self, x, y, s, *args, **kwargs)

    def legend(self, *args, handles=None, **kwargs):
        legends.extend(h.get_label() for h in handles)
        return orig_legend(self, *args, handles=handles, **kwargs)

    monkeypatch.setattr(Figure, "text", text)
    monkeypatch.setattr(Figure, "legend", legend)
    image, label, pred = _phantom()
    pic = case_picture(image, label, pred, ["liver", "tumour"], 3, spacing=(1.0, 1.0, 2.0), axcodes="RAS")
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[1] > 2 * pic.shape[0]  # three panels side by side
    assert legends == ["liver", "tumour", "outline: reference", "fill: model prediction"]
    assert texts == ["validation case 3: slices through the centre of the tumour", CONVENTION]
    # Both classes are drawn in their own colours (outline pixels carry the pure class colour).
    for colour in COLOURS[:2]:
        target = np.round(np.array(colour) * 255)
        assert (np.abs(pic.astype(int) - target).max(axis=-1) <= 2).sum() > 20, colour
    # The same case stored LPS is the same picture.
    lps = case_picture(
        image[::-1, ::-1], label[::-1, ::-1], pred[::-1, ::-1], ["liver", "tumour"], 3, (1.0, 1.0, 2.0), "LPS"
    )
    assert np.array_equal(lps, pic)
