"""Deprecated: MMDetection checkpoint conversion and safe reading moved to :mod:`densedet.weights`
(``densedet.weights.mmdet.convert_mmdet_checkpoint``, ``densedet.weights.files``). The old names keep working with a
``DeprecationWarning``."""
