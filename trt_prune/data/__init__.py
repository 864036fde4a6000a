"""Data sets: :class:`RoadScenes`, procedural road scenes for the built-in detector."""

from trt_prune.data.roads import VAL_LENGTH, RoadScenes, collate_detection

__all__ = ["RoadScenes", "VAL_LENGTH", "collate_detection"]
