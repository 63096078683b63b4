"""``fedimg predict``: apply a model package to new DICOM or NIfTI studies (see :mod:`fedimg.predict.run`)."""

from __future__ import annotations

from fedimg.predict.run import PredictResult, StudyResult, predict

__all__ = ["PredictResult", "StudyResult", "predict"]
