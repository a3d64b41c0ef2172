{{/*
The operator's permissions: exactly unlearning_operator.permissions.RULES,
split by scope. tests/chart/test_rbac.py renders both modes and fails when
these differ from RULES, so edit them together. Nothing here touches Secrets.
*/}}

{{/* Rules on namespaced resources: a ClusterRole (cluster-wide mode) or a Role per watched namespace. */}}
{{- define "unlearning-operator.namespacedRules" -}}
- apiGroups: ["unlearn.dev"]
  resources: ["unlearningrequests"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["unlearn.dev"]
  resources: ["unlearningrequests/status"]
  verbs: ["get", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Rules on cluster-scoped resources: always a (small) ClusterRole. */}}
{{- define "unlearning-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* Rules needed only when watching the whole cluster (kopf lists namespaces then). */}}
{{- define "unlearning-operator.clusterWideRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
