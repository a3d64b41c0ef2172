"""The API's names: its group and version, and the kinds it serves.

One place for what the operator's watches, the Job builder's owner
references, the CRD generator and the job's manifest parser all spell the
same way. A new kind in the group is one more ``Kind`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

API_GROUP = "unlearn.dev"
API_VERSION = "v1alpha1"
API_GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"


@dataclass(frozen=True)
class Kind:
    """A kind of the group, with the names a CRD declares for it."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    categories: tuple[str, ...] = ("unlearning",)

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{API_GROUP}"


REQUEST = Kind(
    kind="UnlearningRequest", plural="unlearningrequests", singular="unlearningrequest", short_names=("ulr",)
)

CALIBRATION = Kind(
    kind="UnlearningCalibration",
    plural="unlearningcalibrations",
    singular="unlearningcalibration",
    short_names=("ulc",),
)
