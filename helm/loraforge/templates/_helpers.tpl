{{/* Names, labels and the pieces every pod shares. */}}

{{- define "loraforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraforge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's object name: `<fullname>-<component>`. Call with (list $ "api"). */}}
{{- define "loraforge.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "loraforge.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "loraforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraforge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of a component's objects. Call with (list $ "api"). */}}
{{- define "loraforge.componentLabels" -}}
{{ include "loraforge.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Selector labels of a component's pods. Call with (list $ "api"). */}}
{{- define "loraforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraforge.name" (index . 0) }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Every pod of this release (NetworkPolicy peers). */}}
{{- define "loraforge.releasePodSelector" -}}
matchLabels:
  app.kubernetes.io/name: {{ include "loraforge.name" . }}
  app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loraforge.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "loraforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraforge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loraforge.operatorServiceAccountName" -}}
{{- default (include "loraforge.componentName" (list . "operator")) .Values.operator.serviceAccount.name }}
{{- end }}

{{/* Pod-level fields every pod shares: security context, pull secrets. */}}
{{- define "loraforge.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling fields from a values block with nodeSelector/tolerations/affinity. */}}
{{- define "loraforge.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container-level security context of the loraforge containers. */}}
{{- define "loraforge.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end }}

{{/* The writable places of a read-only loraforge container: /tmp, $HOME and $LORAFORGE_HOME,
as emptyDir volumes named tmp, home and data. writableVolumes takes
(dict "dataSizeLimit" "2Gi" ["tmpSizeLimit" "1Gi"]). */}}
{{- define "loraforge.writableMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/loraforge
- name: data
  mountPath: /var/lib/loraforge
{{- end }}

{{- define "loraforge.writableVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSizeLimit | default "1Gi" }}
- name: home
  emptyDir:
    sizeLimit: 1Gi
- name: data
  emptyDir:
    sizeLimit: {{ .dataSizeLimit }}
{{- end }}

{{/* Ray token authentication, from a Secret: the head, the workers and `loraforge worker`. */}}
{{- define "loraforge.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
{{- with .Values.ray.auth.existingSecret }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.ray.auth.tokenKey }}
{{- end }}
{{- else }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- end }}

{{/* The settings of every platform process (`LORAFORGE_*`), secrets by reference only. */}}
{{- define "loraforge.env" -}}
- name: LORAFORGE_ENVIRONMENT
  value: {{ .Values.environment | quote }}
- name: LORAFORGE_HOME
  value: /var/lib/loraforge
{{- if .Values.postgresql.enabled }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.postgresql.existingSecret }}
      key: {{ .Values.postgresql.passwordKey }}
- name: LORAFORGE_DATABASE_URL
  value: {{ printf "postgresql+psycopg://loraforge:$(POSTGRES_PASSWORD)@%s:5432/loraforge" (include "loraforge.componentName" (list . "postgresql")) | quote }}
{{- else }}
- name: LORAFORGE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret: name the Secret holding the database URL" .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- end }}
- name: LORAFORGE_S3_BUCKET
  value: {{ .Values.objectStore.bucket | quote }}
- name: LORAFORGE_S3_PREFIX
  value: {{ .Values.objectStore.prefix | quote }}
{{- if .Values.minio.enabled }}
- name: LORAFORGE_S3_ENDPOINT_URL
  value: {{ printf "http://%s:9000" (include "loraforge.componentName" (list . "minio")) | quote }}
- name: LORAFORGE_S3_REGION
  value: us-east-1
- name: LORAFORGE_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.minio.existingSecret }}
      key: {{ .Values.minio.rootUserKey }}
- name: LORAFORGE_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.minio.existingSecret }}
      key: {{ .Values.minio.rootPasswordKey }}
{{- else }}
{{- with .Values.objectStore.endpointUrl }}
- name: LORAFORGE_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.objectStore.region }}
- name: LORAFORGE_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.objectStore.existingSecret }}
- name: LORAFORGE_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.objectStore.accessKeyIdKey }}
- name: LORAFORGE_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.objectStore.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.passwordKey }}
- name: LORAFORGE_BROKER_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "loraforge.componentName" (list . "redis")) | quote }}
{{- else }}
- name: LORAFORGE_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "broker.existingSecret: name the Secret holding the celery broker URL" .Values.broker.existingSecret }}
      key: {{ .Values.broker.urlKey }}
{{- end }}
- name: LORAFORGE_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ required "secretKey.existingSecret: name the Secret holding the secret key" .Values.secretKey.existingSecret }}
      key: {{ .Values.secretKey.key }}
{{- with .Values.controlPlane.api.publicUrl }}
- name: LORAFORGE_PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
{{- range $name, $value := .Values.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* The pod template body of a trainer (`loraforge worker`): a plain Deployment's pod, or a
KubeRay worker pod (then the container starts Ray first). Call with (dict "root" $ "kuberay" bool). */}}
{{- define "loraforge.trainerContainer" -}}
{{- $ := .root }}
{{- $t := $.Values.trainers }}
- name: {{ if .kuberay }}ray-worker{{ else }}trainer{{ end }}
  image: {{ include "loraforge.image" $ }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  {{- if .kuberay }}
  # KubeRay's generated `ray start` (without --block) joins the head; `loraforge worker` then
  # drives this node's trainer actors and is the container's main process.
  command: ["/bin/bash", "-c", "--"]
  args:
    - 'ulimit -n 65536; eval "${KUBERAY_GEN_RAY_START_CMD//--block/}" && exec loraforge worker'
  {{- else }}
  args: [worker]
  {{- end }}
  env:
    {{- include "loraforge.env" $ | nindent 4 }}
    {{- include "loraforge.rayAuthEnv" $ | nindent 4 }}
    {{- if .kuberay }}
    - name: LORAFORGE_RAY_ADDRESS
      value: auto
    {{- else if $.Values.ray.address }}
    - name: LORAFORGE_RAY_ADDRESS
      value: {{ $.Values.ray.address | quote }}
    {{- end }}
    {{- with $t.threads }}
    - name: LORAFORGE_TRAINER_THREADS
      value: {{ . | quote }}
    {{- end }}
  {{- include "loraforge.containerSecurityContext" $ | nindent 2 }}
  {{- include "loraforge.residentBaseResources" $t | nindent 2 }}
  volumeMounts:
    {{- include "loraforge.residentBaseMounts" $ | nindent 4 }}
{{- end }}

{{- define "loraforge.trainerVolumes" -}}
{{- include "loraforge.residentBaseVolumes" .Values.trainers }}
{{- end }}

{{/* What a process holding a base resident needs, shared by the trainers and the interactive
executors so that both stay alike: each takes its values block (`trainers`, `interactive`) with
gpusPerPod, resources, cacheSizeLimit, cacheExistingClaim and shmSizeLimit. The resources, with
the GPU request (a device plugin's extended resource: its request must equal its limit). */}}
{{- define "loraforge.residentBaseResources" -}}
resources:
  requests:
    {{- toYaml .resources.requests | nindent 4 }}
    {{- if gt (int .gpusPerPod) 0 }}
    nvidia.com/gpu: {{ .gpusPerPod }}
    {{- end }}
  limits:
    {{- toYaml .resources.limits | nindent 4 }}
    {{- if gt (int .gpusPerPod) 0 }}
    nvidia.com/gpu: {{ .gpusPerPod }}
    {{- end }}
{{- end }}

{{/* The writable places plus a memory-backed /dev/shm (torch and Ray share tensors there; the
container runtime's default is 64Mi). Call with the root context. */}}
{{- define "loraforge.residentBaseMounts" -}}
{{ include "loraforge.writableMounts" . }}
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/* The volumes behind residentBaseMounts: the base cache on `data` ($LORAFORGE_HOME), an
emptyDir or an existing claim that keeps bases across restarts. */}}
{{- define "loraforge.residentBaseVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 10Gi
- name: home
  emptyDir:
    sizeLimit: 1Gi
- name: data
  {{- if .cacheExistingClaim }}
  persistentVolumeClaim:
    claimName: {{ .cacheExistingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .cacheSizeLimit }}
  {{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSizeLimit }}
{{- end }}

{{/* The interactive executors' bases, as a JSON list of {"base", "slug", "name"}: the name or id
as given (what `--base` needs, verbatim), its slug (lowercase DNS-1123, at most 63 characters: a
label value) and the Deployment's name. Two bases whose names come out the same would be one
Deployment overwriting the other, so the render fails instead. Call with the root context. */}}
{{- define "loraforge.interactiveBases" -}}
{{- $bases := list }}
{{- $seen := dict }}
{{- range $base := .Values.interactive.bases }}
{{- $slug := regexReplaceAll "[^a-z0-9-]+" (lower $base) "-" | trimAll "-" | trunc 63 | trimSuffix "-" }}
{{- $name := include "loraforge.componentName" (list $ (printf "interactive-%s" $slug)) }}
{{- with get $seen $name }}
{{- fail (printf "interactive.bases: %q and %q both become the Deployment %q (lowercased, every run of characters other than a-z, 0-9 and - made one -, cut to 63 characters); give one of them by its id instead" . $base $name) }}
{{- end }}
{{- $_ := set $seen $name $base }}
{{- $bases = append $bases (dict "base" $base "slug" $slug "name" $name) }}
{{- end }}
{{- toJson $bases }}
{{- end }}

{{/* Labels of one base's executors: the component's, plus the base's slug, so that
`kubectl get pods -l loraforge.dev/base=<slug>` finds them. Call with (list $ slug). */}}
{{- define "loraforge.interactiveLabels" -}}
{{ include "loraforge.componentLabels" (list (index . 0) "interactive") }}
loraforge.dev/base: {{ index . 1 }}
{{- end }}

{{/* Selector labels of one base's executors (disjoint between bases). Call with (list $ slug). */}}
{{- define "loraforge.interactiveSelectorLabels" -}}
{{ include "loraforge.selectorLabels" (list (index . 0) "interactive") }}
loraforge.dev/base: {{ index . 1 }}
{{- end }}

{{/* The namespaces the operator watches, as a JSON list (default: the release namespace). */}}
{{- define "loraforge.watchNamespaces" -}}
{{- default (list .Release.Namespace) .Values.operator.watchNamespaces | uniq | toJson }}
{{- end }}

{{/* The operator's permissions in a watched namespace: its custom resources (their status and
finalizers; a finished FineTuningJob past its TTL is deleted), the vLLM pods an AdapterSync
selects, Events, and the Secrets its objects name. */}}
{{- define "loraforge.operatorRules" -}}
{{- $resources := ternary (list "adaptersyncs") (list "finetuningjobs" "adaptersyncs") (eq .Values.operator.mode "adaptersync") }}
- apiGroups: [loraforge.dev]
  resources: {{ toJson $resources }}
  verbs: [get, list, watch, patch, update, delete]
- apiGroups: [loraforge.dev]
  resources:
    {{- range $resources }}
    - {{ . }}/status
    {{- end }}
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [secrets]
  {{- with .Values.operator.secretNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
  verbs: [get]
{{- end }}
