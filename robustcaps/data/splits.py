"""Split names for smallNORB-format data, including the novel-viewpoint protocol.

Hinton et al. 2018, Section 5.1 / Table 2: "we trained both models on one-third of the
training data containing azimuths of (300, 320, 340, 0, 20, 40) and tested on the two-thirds
of the test data that contained azimuths from 60 to 280. In a separate experiment, we trained
on the 3 smaller elevations and tested on the 6 larger elevations." The familiar-viewpoint
test subsets (test data at the training viewpoints) are used to match the models' error rates.

The smallNORB azimuth index a (0, 2, ..., 34) means a*10 degrees; elevation index e (0-8) means
30 + 5e degrees.

| split name                | file split | rows kept                                   |
|---------------------------|------------|---------------------------------------------|
| train / test              | training / testing | all                                 |
| azimuth-train             | training   | azimuth in {300,320,340,0,20,40} degrees    |
| azimuth-test-novel        | testing    | azimuth in 60..280 degrees                  |
| azimuth-test-familiar     | testing    | azimuth in {300,320,340,0,20,40} degrees    |
| elevation-train           | training   | elevation index in {0,1,2}                  |
| elevation-test-novel      | testing    | elevation index in {3,...,8}                |
| elevation-test-familiar   | testing    | elevation index in {0,1,2}                  |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RobustcapsError

#: Training azimuths of the novel-viewpoint experiment, in degrees, and as smallNORB indices.
FAMILIAR_AZIMUTH_DEGREES = (300, 320, 340, 0, 20, 40)
FAMILIAR_AZIMUTHS = tuple(sorted(d // 10 for d in FAMILIAR_AZIMUTH_DEGREES))  # (0, 2, 4, 30, 32, 34)
NOVEL_AZIMUTHS = tuple(range(6, 29, 2))  # 60..280 degrees
FAMILIAR_ELEVATIONS = (0, 1, 2)
NOVEL_ELEVATIONS = tuple(range(3, 9))

_INFO_COL = {"elevation": 1, "azimuth": 2}
_VALUES = {
    ("azimuth", "familiar"): FAMILIAR_AZIMUTHS,
    ("azimuth", "novel"): NOVEL_AZIMUTHS,
    ("elevation", "familiar"): FAMILIAR_ELEVATIONS,
    ("elevation", "novel"): NOVEL_ELEVATIONS,
}


@dataclass(frozen=True)
class SplitSpec:
    """Which official file split to read and which viewpoints to keep (None: all rows)."""

    name: str
    file_split: str  # "training" | "testing"
    axis: str | None = None  # "azimuth" | "elevation"
    subset: str | None = None  # "familiar" | "novel"

    def mask(self, info: np.ndarray) -> np.ndarray:
        """Boolean (N,) mask of the rows of ``info`` (int (N, 4)) that belong to this split."""
        info = np.asarray(info)
        if self.axis is None:
            return np.ones(info.shape[0], dtype=bool)
        return viewpoint_mask(info, self.axis, self.subset or "familiar")


def viewpoint_mask(info: np.ndarray, axis: str, subset: str) -> np.ndarray:
    """Rows of ``info`` (int (N, 4): instance, elevation, azimuth, lighting) at the
    familiar or novel viewpoints of ``axis`` ("azimuth" or "elevation")."""
    if (axis, subset) not in _VALUES:
        raise RobustcapsError(f"unknown viewpoint subset {axis!r}/{subset!r}")
    return np.isin(np.asarray(info)[:, _INFO_COL[axis]], _VALUES[(axis, subset)])


SPLITS: dict[str, SplitSpec] = {
    "train": SplitSpec("train", "training"),
    "test": SplitSpec("test", "testing"),
}
for _axis in ("azimuth", "elevation"):
    SPLITS[f"{_axis}-train"] = SplitSpec(f"{_axis}-train", "training", _axis, "familiar")
    for _subset in ("novel", "familiar"):
        _name = f"{_axis}-test-{_subset}"
        SPLITS[_name] = SplitSpec(_name, "testing", _axis, _subset)

NORB_SPLIT_NAMES = tuple(SPLITS)


def resolve_split(split: str) -> SplitSpec:
    """The :class:`SplitSpec` of a smallNORB-format split name (see the module table)."""
    aliases = {"training": "train", "testing": "test"}
    spec = SPLITS.get(aliases.get(split, split))
    if spec is None:
        raise RobustcapsError(
            f"unknown split {split!r} for smallNORB-format data: use one of {', '.join(SPLITS)}"
        )
    return spec
