{{/*
The operator's permissions: exactly unlearning_operator.permissions.RULES,
split by scope. tests/chart/test_rendered.py renders both modes and fails when
the union differs from RULES, so edit them together. Nothing on Secrets; no
delete anywhere (owner references let the garbage collector clean up).
*/}}

{{/* Rules on namespaced resources: a ClusterRole (cluster-wide mode) or a Role per watched namespace. */}}
{{- define "unlearning-operator.namespacedRules" -}}
# Watch requests and calibrations (indexes and event handlers only: kopf never patches the object itself).
- apiGroups: ["unlearn.dev"]
  resources: ["unlearningrequests", "unlearningcalibrations"]
  verbs: ["list", "watch"]
# Phase, conditions and results.
- apiGroups: ["unlearn.dev"]
  resources: ["unlearningrequests/status", "unlearningcalibrations/status"]
  verbs: ["patch"]
# One Job per request, two per calibration (deleted by the garbage collector through their owner references);
# patch: a request Job's ttlSecondsAfterFinished, set once its result is recorded.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Job pods: pending reasons and the termination message with the result.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# Request and calibration manifests, audit and calibration records (immutable) and model lineage.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "update"]
# Events on requests and calibrations.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# One NetworkPolicy per Job that denies its pod all traffic (read back on 409 to check it is ours).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
{{- end }}

{{/* Rules on cluster-scoped resources: always a small ClusterRole. */}}
{{- define "unlearning-operator.clusterRules" -}}
# kopf discovers the resources it serves.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{/* Leader election (permissions.leader_election_rules): a Role in the release namespace. */}}
{{- define "unlearning-operator.leaderElectionRules" -}}
# Read, renew and take over the one Lease.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "update"]
  resourceNames: [{{ include "unlearning-operator.fullname" . | quote }}]
# Create it the first time (create cannot be limited by name).
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
{{- end }}
