"""Moved to `vitseg_export.verdict.testing`; this import path keeps working for one release."""

import warnings

from vitseg_export.verdict.testing import assert_mask_parity

warnings.warn("vitseg_export.testing moved: import assert_mask_parity from vitseg_export.verdict.testing",
              DeprecationWarning, stacklevel=2)

__all__ = ["assert_mask_parity"]
