"""The labels and annotations every child object carries, in one place (no copied merges in handlers).

The ``app.kubernetes.io/*`` set is what kubectl, dashboards and the chart's
selectors expect; ``unlearn.dev/request`` and ``unlearn.dev/model`` let a
person (and the operator's watches) find everything for a request or a model
with one selector. Label values are limited to 63 characters: request names
are capped at 48 by the CRD and model names are DNS labels.
"""

from __future__ import annotations

APP_NAME = "unlearning-operator"
MANAGED_BY = "unlearning-operator"

COMPONENT_JOB = "unlearning-job"
COMPONENT_AUDIT = "audit-record"
COMPONENT_LINEAGE = "lineage"
COMPONENT_CALIBRATION_FOLDS = "calibration-folds"
COMPONENT_CALIBRATION_MERGE = "calibration-merge"
COMPONENT_CALIBRATION_RECORD = "calibration-record"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_REQUEST = "unlearn.dev/request"
LABEL_MODEL = "unlearn.dev/model"
LABEL_CALIBRATION = "unlearn.dev/calibration"
LABEL_AUDIT = "unlearn.dev/audit"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

ANNOTATION_MODEL_VERSION = "unlearn.dev/model-version"
"""On a Job: the model version it writes (completion reads it back, never the request)."""
ANNOTATION_REQUEST_UID = "unlearn.dev/request-uid"
"""On every object made for a request (Job, spec and audit ConfigMaps): the uid of the request object."""
ANNOTATION_SPEC_GENERATION = "unlearn.dev/spec-generation"
"""On a Job: the request's metadata.generation it was built from."""
ANNOTATION_INPUT_MODEL = "unlearn.dev/input-model"
"""On a Job: the uri of the model version it starts from."""
ANNOTATION_OUTPUT_LOCATION = "unlearn.dev/output-location"
"""On a Job: the uri of the folder its new version must be written under."""
ANNOTATION_CALIBRATION_UID = "unlearn.dev/calibration-uid"
"""On a calibration's Jobs and record: the uid of the UnlearningCalibration it belongs to."""
ANNOTATION_BANK = "unlearn.dev/calibration-bank"
"""On a request's Job: JSON {name, uri, sha256} of the bank it was given (a restarted operator reads it back)."""


def common_labels(*, instance: str, component: str, model: str, request: str | None = None) -> dict[str, str]:
    labels = {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: instance,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: APP_NAME,
        LABEL_MODEL: model,
    }
    if request is not None:
        labels[LABEL_REQUEST] = request
    return labels


def calibration_labels(*, calibration: str, component: str, model: str) -> dict[str, str]:
    """Labels of an object that belongs to one calibration (its Jobs, manifest and record)."""
    labels = common_labels(instance=calibration, component=component, model=model)
    labels[LABEL_CALIBRATION] = calibration
    return labels


def request_labels(*, request: str, component: str, model: str) -> dict[str, str]:
    """Labels of an object that belongs to one request (Job, spec and audit ConfigMaps)."""
    return common_labels(instance=request, component=component, model=model, request=request)
