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

{{/* ServiceAccount of the combiner pods. */}}
{{- define "eftmesh.combinerServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-combiner" (include "eftmesh.fullname" .)) .Values.serviceAccount.combinerName }}
{{- else }}
{{- default "default" .Values.serviceAccount.combinerName }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the logit pods. */}}
{{- define "eftmesh.logitServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-logit" (include "eftmesh.fullname" .)) .Values.serviceAccount.logitName }}
{{- else }}
{{- default "default" .Values.serviceAccount.logitName }}
{{- end }}
{{- end }}

{{/* Image of a component: (dict "root" $ "image" <component image values>). Empty fields fall back to .Values.image; the cpu variant's default tag ends in "-cpu". */}}
{{- define "eftmesh.componentImage" -}}
{{- $img := .image }}
{{- $repo := default .root.Values.image.repository $img.repository }}
{{- $tag := default (default .root.Chart.AppVersion .root.Values.image.tag) $img.tag }}
{{- if and (not $img.tag) (eq (default "cuda" $img.variant) "cpu") }}
{{- $tag = printf "%s-cpu" $tag }}
{{- end }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* A gRPC health probe: (dict "port" N "probe" {periodSeconds, timeoutSeconds, failureThreshold}). */}}
{{- define "eftmesh.grpcProbe" -}}
grpc: {port: {{ .port }}{{ with .service }}, service: {{ . }}{{ end }}}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/* Default topology spread over nodes for pods matching `labels`: (dict "spread" <value or null> "labels" <dict>). */}}
{{- define "eftmesh.topologySpread" -}}
{{- if kindIs "invalid" .spread }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- toYaml .labels | nindent 8 }}
{{- else if .spread }}
topologySpreadConstraints:
  {{- toYaml .spread | nindent 2 }}
{{- end }}
{{- end }}

{{/* Volumes for a storage block: (dict "root" $ "storage" <storage values> "claim" <PVC name>). */}}
{{- define "eftmesh.storageVolumes" -}}
{{- $s := .storage }}
{{- if or (eq $s.source "pvc") (and (eq $s.source "hub") $s.hub.persist) }}
- name: model-store
  persistentVolumeClaim:
    claimName: {{ default .claim $s.existingClaim }}
    {{- if eq $s.source "pvc" }}
    readOnly: true
    {{- end }}
{{- else if eq $s.source "hub" }}
- name: model-store
  emptyDir:
    sizeLimit: {{ $s.emptyDirSizeLimit }}
{{- end }}
{{- if and (eq $s.source "hub") $s.hub.tokenSecret }}
- name: hf-token
  secret:
    secretName: {{ $s.hub.tokenSecret }}
    defaultMode: 0400
    items:
      - key: {{ $s.hub.tokenSecretKey }}
        path: token
{{- end }}
{{- end }}

{{/* The serving container's mount of a storage block (read-only). */}}
{{- define "eftmesh.storageVolumeMounts" -}}
{{- if ne .source "image" }}
- name: model-store
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The model path a storage block serves: `model` when set, else mountPath/<hub id>. */}}
{{- define "eftmesh.modelPath" -}}
{{- if .model }}
{{- .model }}
{{- else if and (eq .storage.source "hub") .storage.hub.id }}
{{- printf "%s/%s" .storage.mountPath .storage.hub.id }}
{{- end }}
{{- end }}

{{/* Init container downloading a hub id into the storage volume: (dict "root" $ "storage" <storage values>). */}}
{{- define "eftmesh.hubInitContainer" -}}
{{- $s := .storage }}
{{- $root := .root }}
{{- if eq $s.source "hub" }}
{{- if not $s.hub.id }}
{{- fail "storage.hub.id is required with storage.source hub (e.g. Qwen/Qwen2.5-7B)" }}
{{- end }}
- name: fetch-model
  image: {{ .image }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  # huggingface_hub ships in the image (transformers needs it). Resumes a partial download and
  # skips files already complete, so a restart or a persistent volume costs no second download.
  command:
    - python
    - -c
    - |
      import os
      from huggingface_hub import snapshot_download
      snapshot_download(os.environ["HUB_ID"], revision=os.environ["HUB_REVISION"],
                        local_dir=os.environ["HUB_DIR"],
                        allow_patterns=os.environ["HUB_PATTERNS"].split() or None)
  env:
    - {name: HUB_ID, value: {{ $s.hub.id | quote }}}
    - {name: HUB_REVISION, value: {{ $s.hub.revision | quote }}}
    - {name: HUB_DIR, value: {{ printf "%s/%s" $s.mountPath $s.hub.id | quote }}}
    - {name: HUB_PATTERNS, value: {{ join " " $s.hub.allowPatterns | quote }}}
    - {name: HF_HOME, value: /tmp/hf}
    - {name: HF_HUB_OFFLINE, value: "0"}
    - {name: HF_HUB_DISABLE_TELEMETRY, value: "1"}
    {{- if $s.hub.tokenSecret }}
    - {name: HF_TOKEN_PATH, value: /var/run/secrets/huggingface/token}
    {{- end }}
  resources:
    {{- toYaml $s.hub.resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: model-store
      mountPath: {{ $s.mountPath }}
    {{- if $s.hub.tokenSecret }}
    - name: hf-token
      mountPath: /var/run/secrets/huggingface
      readOnly: true
    {{- end }}
{{- end }}
{{- end }}

{{/* preStop: pause so the endpoints controller removes the pod before SIGTERM arrives. */}}
{{- define "eftmesh.preStop" -}}
{{- if gt (int .) 0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ . }}"]
{{- end }}
{{- end }}

{{/* checkov skips shared by every workload, each with its reason (see docs/deployment.md, "Security scan"). */}}
{{- define "eftmesh.checkovSkips" -}}
checkov.io/skip1: "CKV_K8S_43=Images are referenced by release tag so one values file serves every release; pin a digest by setting the image tag to tag@sha256:..."
checkov.io/skip2: "CKV_K8S_15=IfNotPresent with immutable release tags avoids re-pulling multi-GB CUDA images on every start; pullPolicy is a value"
checkov.io/skip3: "CKV_K8S_11=No CPU limit on purpose: CFS throttling of a forward pass or a token stream only adds latency; CPU requests are set"
{{- end }}

{{/* TLS Secret (kubernetes.io/tls: tls.crt, tls.key, ca.crt) of a component ("combiner" or "logit"). */}}
{{- define "eftmesh.tlsSecretName" -}}
{{- $own := ternary .root.Values.tls.combinerSecret .root.Values.tls.logitSecret (eq .component "combiner") }}
{{- default (printf "%s-%s-tls" (include "eftmesh.fullname" .root) .component) $own }}
{{- end }}

{{/* The combiner's bearer-token Secret: auth.existingSecret, else the one the chart creates. */}}
{{- define "eftmesh.authSecretName" -}}
{{- default (printf "%s-combiner-tokens" (include "eftmesh.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* A Service's in-cluster DNS names: name, name.ns, name.ns.svc, name.ns.svc.cluster.local. */}}
{{- define "eftmesh.serviceDnsNames" -}}
- {{ .name }}
- {{ .name }}.{{ .namespace }}
- {{ .name }}.{{ .namespace }}.svc
- {{ .name }}.{{ .namespace }}.svc.{{ .domain }}
{{- end }}

{{/* A TLS Secret as a read-only volume (its keys only, mode 0440 for the pod's group). */}}
{{- define "eftmesh.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "eftmesh.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}

{{- define "eftmesh.tlsVolumeMount" -}}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}

{{/* TLS is on only with the health-only ports: kubelet gRPC probes cannot speak TLS. */}}
{{- define "eftmesh.checkTls" -}}
{{- if and .Values.tls.enabled (or (not .Values.logit.healthPort) (not .Values.combiner.healthPort)) }}
{{- fail "tls.enabled needs logit.healthPort and combiner.healthPort: the kubelet's gRPC probes cannot speak TLS, so they use the plaintext health-only port" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name: a cert-manager CA Issuer (or ClusterIssuer) of the mesh" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.tokens) }}
{{- fail "auth.enabled needs auth.existingSecret (a Secret whose auth.secretKey holds one token per line) or auth.tokens" }}
{{- end }}
{{- end }}
