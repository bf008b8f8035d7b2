"""Images and preprocessing: how image files become model inputs (:mod:`~vitqc.data.preprocess`), folders of
them (:mod:`~vitqc.data.images`) and seeded class-balanced choices (:mod:`~vitqc.data.sampling`). Calibration
draws live in :mod:`vitqc.calib`."""
from vitqc.data.images import (IMAGE_EXTENSIONS, ImageFolderData, LabeledImages, collate_skipping, decode,
                               iterate_labeled, warn_skipped)
from vitqc.data.preprocess import CROP_MODES, INTERPOLATIONS, ConvertMode, Preprocess
from vitqc.data.sampling import balanced_order, spread_indices

__all__ = ["Preprocess", "ConvertMode", "INTERPOLATIONS", "CROP_MODES", "IMAGE_EXTENSIONS", "ImageFolderData",
           "decode", "iterate_labeled", "LabeledImages", "collate_skipping", "warn_skipped", "balanced_order",
           "spread_indices"]
