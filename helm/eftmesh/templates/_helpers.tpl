{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "eftmesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified base name: "<release>-eftmesh", or the release name when it already contains the chart name. */}}
{{- define "eftmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Object name of one logit role's Deployment and Service. */}}
{{- define "eftmesh.logitName" -}}
{{- printf "%s-logit-%s" (include "eftmesh.fullname" .root) .role | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Headless Service of one logit role: DNS lists every ready pod, so the combiner can pin each session to one. */}}
{{- define "eftmesh.logitReplicasName" -}}
{{- printf "%s-replicas" (include "eftmesh.logitName" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "eftmesh.combinerName" -}}
{{- printf "%s-combiner" (include "eftmesh.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "eftmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "eftmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eftmesh
{{- end }}

{{- define "eftmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eftmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "eftmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "eftmesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "eftmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Environment shared by every pod: OpenTelemetry, where Hugging Face may write, pod identity. */}}
{{- define "eftmesh.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: HF_HOME
  value: /tmp/hf
- name: HF_HUB_OFFLINE
  value: "1"
{{- with .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_EXPORTER_OTLP_INSECURE
  value: {{ $.Values.otel.insecure | quote }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.node.name=$(NODE_NAME),service.namespace=%s%s" .Release.Name (ternary (printf ",%s" .Values.otel.extraResourceAttributes) "" (ne .Values.otel.extraResourceAttributes "")) | quote }}
{{- end }}

{{/* Volumes every pod has: a writable /tmp and, when configured, the model volume. */}}
{{- define "eftmesh.volumes" -}}
- name: tmp
  emptyDir: {}
{{- with .Values.models.volume }}
- name: models
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "eftmesh.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.models.volume }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod annotations: the user's, and Prometheus scrape hints when metrics are on. */}}
{{- define "eftmesh.podAnnotations" -}}
{{- $a := deepCopy (default dict .Values.podAnnotations) }}
{{- if .Values.metrics.enabled }}
{{- $_ := set $a "prometheus.io/scrape" "true" }}
{{- $_ := set $a "prometheus.io/port" (toString .Values.metrics.port) }}
{{- $_ := set $a "prometheus.io/path" "/metrics" }}
{{- end }}
{{- with $a }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The metrics flag and container port, when metrics are on. */}}
{{- define "eftmesh.metricsArgs" -}}
{{- if .Values.metrics.enabled }}
- --metrics-port={{ .Values.metrics.port }}
{{- end }}
{{- end }}

{{- define "eftmesh.metricsPort" -}}
{{- if .Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end }}
