{{/*
The chart name, or nameOverride; cut to 63 characters (a label value's limit).
*/}}
{{- define "returns-classifier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The fully qualified app name: "<release>-<chart>" (or just the release when it already contains
the chart name), cut to 63 characters because some Kubernetes name fields are DNS labels.
*/}}
{{- define "returns-classifier.fullname" -}}
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

{{/*
A component's object name: the fullname cut so that "<fullname>-<suffix>" fits in `max`
characters (default 63). Call with (dict "ctx" $ "suffix" "nightly" "max" 52).
*/}}
{{- define "returns-classifier.componentName" -}}
{{- $max := .max | default 63 | int }}
{{- $base := include "returns-classifier.fullname" .ctx | trunc (sub $max (add1 (len .suffix)) | int) | trimSuffix "-" }}
{{- printf "%s-%s" $base .suffix }}
{{- end }}

{{/*
The CronJob's name. 52 characters at most: the controller appends an 11-character suffix to
name each Job, and Job names must stay within 63.
*/}}
{{- define "returns-classifier.nightlyName" -}}
{{- include "returns-classifier.componentName" (dict "ctx" . "suffix" "nightly" "max" 52) }}
{{- end }}

{{/*
Chart name and version as used by the helm.sh/chart label.
*/}}
{{- define "returns-classifier.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: the stable subset used in selectors (never add mutable labels here).
*/}}
{{- define "returns-classifier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "returns-classifier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels of every object.
*/}}
{{- define "returns-classifier.labels" -}}
helm.sh/chart: {{ include "returns-classifier.chart" . }}
{{ include "returns-classifier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: returns-classifier
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of one component's objects. Call with (dict "ctx" $ "component" "serving").
*/}}
{{- define "returns-classifier.componentLabels" -}}
{{ include "returns-classifier.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Selector labels of one component. Call with (dict "ctx" $ "component" "serving").
*/}}
{{- define "returns-classifier.componentSelectorLabels" -}}
{{ include "returns-classifier.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
An image reference "registry/repository:tag[@digest]" from an image block. A digest, when
given, pins the image. Call with (dict "image" .Values.x.image "ctx" $); an empty tag falls
back to the chart's appVersion.
*/}}
{{- define "returns-classifier.image" -}}
{{- $tag := .image.tag | default .ctx.Chart.AppVersion | toString }}
{{- $repo := .image.repository }}
{{- if .image.registry }}
{{- $repo = printf "%s/%s" .image.registry .image.repository }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" $repo $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/*
Name of the serving and training ServiceAccount.
*/}}
{{- define "returns-classifier.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "returns-classifier.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the submitter's ServiceAccount.
*/}}
{{- define "returns-classifier.submitterServiceAccountName" -}}
{{- if .Values.nightly.serviceAccount.create }}
{{- default (include "returns-classifier.componentName" (dict "ctx" . "suffix" "submitter")) .Values.nightly.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.nightly.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Claim name of a volume: its existingClaim, or the claim the chart creates.
Call with (dict "ctx" $ "volume" "model").
*/}}
{{- define "returns-classifier.claimName" -}}
{{- $p := index .ctx.Values.persistence .volume }}
{{- if $p.existingClaim }}
{{- $p.existingClaim }}
{{- else }}
{{- include "returns-classifier.componentName" (dict "ctx" .ctx "suffix" .volume) }}
{{- end }}
{{- end }}

{{/*
Name of the ConfigMap holding config.properties and the readiness script.
*/}}
{{- define "returns-classifier.configName" -}}
{{- include "returns-classifier.componentName" (dict "ctx" . "suffix" "config") }}
{{- end }}

{{/*
Folder of one model version inside the model claim: [<persistence.model.path>/]<model.name>/<version>.
Call with (dict "ctx" $ "version" "1.0.0").
*/}}
{{- define "returns-classifier.versionPath" -}}
{{- $root := .ctx.Values.persistence.model.path | trimAll "/" }}
{{- $rel := printf "%s/%s" .ctx.Values.model.name (toString .version) }}
{{- if $root }}{{ printf "%s/%s" $root $rel }}{{ else }}{{ $rel }}{{ end }}
{{- end }}

{{/*
KServe's storageUri: the version folder on the model claim, pvc://<claim>/<version path>. A new
model.version is a new storageUri, hence a new revision.
*/}}
{{- define "returns-classifier.storageUri" -}}
{{- printf "pvc://%s/%s" (include "returns-classifier.claimName" (dict "ctx" . "volume" "model")) (include "returns-classifier.versionPath" (dict "ctx" . "version" .Values.model.version)) }}
{{- end }}

{{/*
Labels that say which model version a serving pod runs and which track (stable or canary) it
belongs to. Call with (dict "ctx" $ "version" "1.0.0" "track" "stable").
*/}}
{{- define "returns-classifier.versionLabels" -}}
returns-classifier/model-version: {{ .version | toString | quote }}
returns-classifier/track: {{ .track }}
{{- end }}

{{/*
The init containers that make a model version available, identical in both serving modes:
fetch-model (returns-fetch-model: fetch the version's tar when its folder is missing, check the
pinned SHA-256, unpack atomically) and, when serving.verifyArchive.enabled, verify-archive
(returns-verify-archive: the .mar against artifact_manifest.json). Both run the submitter image
(standard library only). Call with (dict "ctx" $ "version" v "sha256" s "url" u).
*/}}
{{- define "returns-classifier.modelInitContainers" -}}
{{- $ctx := .ctx }}
{{- $src := $ctx.Values.model.source }}
{{- $url := .url | default "" }}
{{- $image := include "returns-classifier.image" (dict "image" $ctx.Values.nightly.image "ctx" $ctx) }}
- name: fetch-model
  image: {{ $image }}
  imagePullPolicy: {{ $ctx.Values.nightly.image.pullPolicy }}
  command: ["returns-fetch-model"]
  args:
    - --dest
    - {{ printf "/models/%s/%s" $ctx.Values.model.name (toString .version) | quote }}
    {{- if $url }}
    - --source
    {{- if $src.existingClaim }}
    - {{ printf "/mnt/model-source/%s" ($url | trimPrefix "/") | quote }}
    {{- else }}
    - {{ $url | quote }}
    {{- end }}
    - --sha256
    - {{ required (printf "a pinned SHA-256 is required to fetch model version %s from %s" (toString .version) $url) .sha256 | quote }}
    - --timeout
    - {{ $src.timeoutSeconds | quote }}
    {{- if hasPrefix "s3://" $url }}
    - --s3-region
    - {{ $src.s3.region | quote }}
    {{- with $src.s3.endpoint }}
    - --s3-endpoint
    - {{ . | quote }}
    {{- end }}
    {{- end }}
    {{- else if .sha256 }}
    - --sha256
    - {{ .sha256 | quote }}
    {{- end }}
  env:
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
  {{- if hasPrefix "s3://" $url }}
  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and optionally AWS_SESSION_TOKEN.
  envFrom:
    - secretRef:
        name: {{ required "model.source.s3.existingSecret is required for an s3:// model source" $src.s3.existingSecret }}
  {{- end }}
  securityContext:
    {{- include "returns-classifier.containerSecurityContext" $ctx | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 64Mi
    limits:
      memory: 256Mi
  volumeMounts:
    # The model root, writable: the version folder is renamed into place here.
    - name: model
      mountPath: /models
      {{- with $ctx.Values.persistence.model.path | trimAll "/" }}
      subPath: {{ . }}
      {{- end }}
    {{- if $src.existingClaim }}
    - name: model-source
      mountPath: /mnt/model-source
      readOnly: true
    {{- end }}
    - name: tmp
      mountPath: /tmp
{{- if $ctx.Values.serving.verifyArchive.enabled }}
# Refuse to serve an archive whose SHA-256 differs from artifact_manifest.json.
- name: verify-archive
  image: {{ $image }}
  imagePullPolicy: {{ $ctx.Values.nightly.image.pullPolicy }}
  command: ["returns-verify-archive", "/mnt/models"]
  env:
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
  securityContext:
    {{- include "returns-classifier.containerSecurityContext" $ctx | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 64Mi
    limits:
      memory: 256Mi
  volumeMounts:
    {{- include "returns-classifier.modelMount" (dict "ctx" $ctx "mountPath" "/mnt/models" "readOnly" true "version" .version) | nindent 4 }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/*
The volumes the model init containers need: the model claim (writable, for fetch-model) and the
source claim when model.source.existingClaim is set.
*/}}
{{- define "returns-classifier.modelVolumes" -}}
- name: model
  persistentVolumeClaim:
    claimName: {{ include "returns-classifier.claimName" (dict "ctx" . "volume" "model") }}
{{- with .Values.model.source.existingClaim }}
- name: model-source
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
{{- end }}

{{/*
Selector labels of the serving pods, in either mode (KServe labels its predictor pods with the
InferenceService name).
*/}}
{{- define "returns-classifier.servingPodSelector" -}}
{{- if eq .Values.serving.mode "kserve" }}
serving.kserve.io/inferenceservice: {{ include "returns-classifier.fullname" . }}
{{- else }}
{{ include "returns-classifier.componentSelectorLabels" (dict "ctx" . "component" "serving") }}
{{- end }}
{{- end }}

{{/*
Base URL of the inference API inside the namespace. The short Service name resolves from any
pod of the namespace, so the plain manifests in k8s/ work in whatever namespace they land.
*/}}
{{- define "returns-classifier.inferenceEndpoint" -}}
{{- if eq .Values.serving.mode "kserve" }}
{{- printf "http://%s-predictor" (include "returns-classifier.fullname" .) }}
{{- else }}
{{- printf "http://%s:%d" (include "returns-classifier.fullname" .) (int .Values.serving.ports.inference) }}
{{- end }}
{{- end }}

{{/*
The submitter's API flavour: TorchServe's own /predictions or KServe's v1 protocol.
*/}}
{{- define "returns-classifier.api" -}}
{{- if eq .Values.serving.mode "kserve" }}v1{{ else }}predictions{{ end }}
{{- end }}

{{/*
Pod security context: the component's values plus the settings that are never optional.
Call with the component's podSecurityContext.
*/}}
{{- define "returns-classifier.podSecurityContext" -}}
{{- $fixed := dict "runAsNonRoot" true "seccompProfile" (dict "type" "RuntimeDefault") }}
{{- toYaml (merge $fixed (deepCopy .)) }}
{{- end }}

{{/*
Container security context shared by every container of the chart.
*/}}
{{- define "returns-classifier.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Resources with the GPU limit added when gpu.enabled. Call with (dict "ctx" $ "resources" ...).
*/}}
{{- define "returns-classifier.gpuResources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if .ctx.Values.gpu.enabled }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits .ctx.Values.gpu.resourceName (int .ctx.Values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
Scheduling of GPU pods: nodeSelector, tolerations, affinity and runtimeClassName, where the GPU
settings apply only when gpu.enabled. Call with (dict "ctx" $ "component" .Values.serving).
*/}}
{{- define "returns-classifier.gpuScheduling" -}}
{{- $gpu := .ctx.Values.gpu }}
{{- $nodeSelector := deepCopy (.component.nodeSelector | default dict) }}
{{- $tolerations := .component.tolerations | default list }}
{{- if $gpu.enabled }}
{{- $nodeSelector = merge $nodeSelector (deepCopy ($gpu.nodeSelector | default dict)) }}
{{- $tolerations = concat ($gpu.tolerations | default list) $tolerations }}
{{- with $gpu.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .component.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The token Secret's volume, when TorchServe token auth is on.
*/}}
{{- define "returns-classifier.tokenSecretName" -}}
{{- required "serving.tokenAuth.existingSecret is required when serving.tokenAuth.enabled is true" .Values.serving.tokenAuth.existingSecret }}
{{- end }}

{{/*
Mount of one model version's folder. Call with
(dict "ctx" $ "mountPath" "/mnt/models" "readOnly" true "version" "1.0.0").
*/}}
{{- define "returns-classifier.modelMount" -}}
- name: model
  mountPath: {{ .mountPath }}
  subPath: {{ include "returns-classifier.versionPath" (dict "ctx" .ctx "version" .version) }}
  readOnly: {{ .readOnly }}
{{- end }}

{{/*
Environment of the training containers: a read-only root filesystem, so caches go to /tmp.
*/}}
{{- define "returns-classifier.trainingEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: TORCH_HOME
  value: /tmp/torch
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{/*
Volume mounts of the training containers: the archive folder, a work folder for checkpoints
(".training" on the same claim), optional photos, and scratch space.
*/}}
{{- define "returns-classifier.trainingMounts" -}}
{{ include "returns-classifier.modelMount" (dict "ctx" . "mountPath" "/mnt/models" "readOnly" false "version" .Values.model.version) }}
- name: model
  mountPath: /mnt/work
  subPath: {{ list (.Values.persistence.model.path | trimAll "/") ".training" (toString .Values.model.version) | compact | join "/" }}
{{- if .Values.training.dataClaim }}
- name: data
  mountPath: /data/images
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/*
A chart file as the body of a YAML block scalar: indented, without trailing blanks on empty
lines. Call with (dict "ctx" $ "file" "files/x.py" "indent" 4).
*/}}
{{- define "returns-classifier.fileBlock" -}}
{{ regexReplaceAll "(?m)[ \t]+$" (.ctx.Files.Get .file | nindent (int .indent)) "" }}
{{- end }}

{{/*
"true" when the InferenceService runs on Knative: deploymentMode Knative (KServe 0.16+) or its
earlier name Serverless. RawDeployment and Standard are plain Deployments.
*/}}
{{- define "returns-classifier.kserveKnative" -}}
{{- has .Values.serving.kserve.deploymentMode (list "Knative" "Serverless") }}
{{- end }}
