{{/* Object names: "<release>-<chart>" unless the release name already contains the chart name. */}}
{{- define "unlearning-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "unlearning-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "unlearning-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "unlearning-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "unlearning-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator pods: what Services, the PodDisruptionBudget, topology spread and
NetworkPolicies select. The Deployment's own selector stays the two labels
above (a Deployment's selector is immutable); the component label keeps the
`helm test` pod, which carries the release's labels too, out of all of them.
*/}}
{{- define "unlearning-operator.podSelectorLabels" -}}
{{ include "unlearning-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The `helm test` pod: another app.kubernetes.io/name, so that neither the
Deployment's ReplicaSet (which adopts orphan pods matching its selector) nor
the Service ever counts it as an operator pod.
*/}}
{{- define "unlearning-operator.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "unlearning-operator.name" . | trunc 58 | trimSuffix "-" }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{- define "unlearning-operator.testLabels" -}}
helm.sh/chart: {{ include "unlearning-operator.chart" . }}
{{ include "unlearning-operator.testSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "unlearning-operator.labels" -}}
helm.sh/chart: {{ include "unlearning-operator.chart" . }}
{{ include "unlearning-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "unlearning-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "unlearning-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is set (what the release and the tests pin), else repository:tag. */}}
{{- define "unlearning-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "unlearning-operator.jobImage" -}}
{{- if .Values.job.image.digest }}
{{- printf "%s@%s" .Values.job.image.repository .Values.job.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.job.image.repository (default .Chart.AppVersion .Values.job.image.tag) }}
{{- end }}
{{- end }}

{{/* True when the cluster serves the Prometheus Operator API (ServiceMonitor, PodMonitor). */}}
{{- define "unlearning-operator.hasMonitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/*
The restricted Pod Security Standard, as a container securityContext. The
root filesystem is read-only; /tmp is an emptyDir for the libraries that
need scratch space.
*/}}
{{- define "unlearning-operator.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "unlearning-operator.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The egress rule to the API server's endpoints (the operator and the helm test pod). */}}
{{- define "unlearning-operator.apiServerEgress" -}}
- ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.apiServer.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}
