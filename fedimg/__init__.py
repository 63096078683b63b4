"""fedimg: federated medical-imaging training.

Sites turn their DICOM studies into normalized volumes offline
(:mod:`fedimg.preprocess`), then NVFlare jobs train shared models across the
sites (:mod:`fedimg.fl`). Importing this package has no side effects.
"""

__version__ = "0.1.0"
