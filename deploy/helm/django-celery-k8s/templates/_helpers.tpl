{{/* Names, labels and the pieces every pod of the app image shares. */}}

{{- define "django-celery-k8s.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "django-celery-k8s.fullname" -}}
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
"<fullname>-<suffix>", the fullname shortened so the whole fits in a Kubernetes name: 63
characters, or 52 for a StatefulSet (its pods get a label of the name plus 11 characters).
Cutting the joined name instead could drop the suffix and give two objects one name.
Called with (list $ "suffix") or (list $ "suffix" 52).
*/}}
{{- define "django-celery-k8s.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $max := 63 -}}
{{- if gt (len .) 2 }}{{ $max = index . 2 }}{{ end -}}
{{- $base := include "django-celery-k8s.fullname" $root | trunc (int (sub $max (add1 (len $suffix)))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end }}

{{- define "django-celery-k8s.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "django-celery-k8s.labels" -}}
helm.sh/chart: {{ include "django-celery-k8s.chart" . }}
{{ include "django-celery-k8s.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "django-celery-k8s.name" . }}
{{- end }}

{{/* Selector labels of the whole release: name and instance only, stable across upgrades. */}}
{{- define "django-celery-k8s.selectorLabels" -}}
app.kubernetes.io/name: {{ include "django-celery-k8s.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of one component: dict "root" $ "component" "web" [ "pool" "default" ].
Only name, instance, component (and a worker's pool): never the version or chart labels.
*/}}
{{- define "django-celery-k8s.componentSelectorLabels" -}}
{{ include "django-celery-k8s.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
app.kubernetes.io/worker-pool: {{ . }}
{{- end }}
{{- end }}

{{/* All labels of one component: dict "root" $ "component" "web" [ "pool" "default" ]. */}}
{{- define "django-celery-k8s.componentLabels" -}}
{{ include "django-celery-k8s.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
app.kubernetes.io/worker-pool: {{ . }}
{{- end }}
{{- end }}

{{/* The one image of every app role; a digest pins it when set. */}}
{{- define "django-celery-k8s.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "django-celery-k8s.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "django-celery-k8s.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "django-celery-k8s.configMapName" -}}
{{- include "django-celery-k8s.fullname" . }}
{{- end }}

{{/* The Secret the app reads: the user's existingSecret or the chart's own. */}}
{{- define "django-celery-k8s.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "django-celery-k8s.fullname" .) }}
{{- end }}

{{/* The Secret holding the generated passwords of the bundled Redis and PostgreSQL. */}}
{{- define "django-celery-k8s.bundledSecretName" -}}
{{- include "django-celery-k8s.componentName" (list . "bundled") }}
{{- end }}

{{- define "django-celery-k8s.redisName" -}}
{{- include "django-celery-k8s.componentName" (list . "redis" 52) }}
{{- end }}

{{- define "django-celery-k8s.postgresqlName" -}}
{{- include "django-celery-k8s.componentName" (list . "postgresql" 52) }}
{{- end }}

{{/* FLOWER_URL_PREFIX: flower.urlPrefix, else the ingress path when Flower is routed there. */}}
{{- define "django-celery-k8s.flowerUrlPrefix" -}}
{{- if .Values.flower.urlPrefix }}
{{- .Values.flower.urlPrefix | trimAll "/" }}
{{- else if and .Values.ingress.enabled .Values.ingress.flower.enabled }}
{{- .Values.ingress.flower.path | trimAll "/" }}
{{- end }}
{{- end }}

{{/* Pod annotations that roll pods when the settings change. */}}
{{- define "django-celery-k8s.checksumAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}

{{/*
Pod annotations and labels: dict "root" $ "comp" <component values>. The component's own
are merged over defaults.*.
*/}}
{{- define "django-celery-k8s.podAnnotations" -}}
{{- $annotations := merge (deepCopy (.comp.podAnnotations | default dict)) (deepCopy .root.Values.defaults.podAnnotations) }}
{{- include "django-celery-k8s.checksumAnnotations" .root }}
{{- with $annotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "django-celery-k8s.podLabels" -}}
{{- $labels := merge (deepCopy (.comp.podLabels | default dict)) (deepCopy .root.Values.defaults.podLabels) }}
{{- with $labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* envFrom of every app container: the settings and the secrets. */}}
{{- define "django-celery-k8s.envFrom" -}}
- configMapRef:
    name: {{ include "django-celery-k8s.configMapName" . }}
- secretRef:
    name: {{ include "django-celery-k8s.secretName" . }}
{{- end }}

{{/* Extra env of a container: dict "root" $ "comp" <component values> "extra" <map>. */}}
{{- define "django-celery-k8s.extraEnv" -}}
{{- $env := merge (deepCopy (.extra | default dict)) (deepCopy (.comp.env | default dict)) (deepCopy .root.Values.defaults.env) }}
{{- range $name := keys $env | sortAlpha }}
- name: {{ $name }}
  value: {{ index $env $name | toString | quote }}
{{- end }}
{{- end }}

{{/* Resources: the component's own, else defaults.resources. */}}
{{- define "django-celery-k8s.resources" -}}
{{- toYaml (.comp.resources | default .root.Values.defaults.resources) }}
{{- end }}

{{/*
Scheduling and security of a pod of the app image: dict "root" $ "comp" <values> "selector" <labels yaml>.
Rendered at the indentation of a pod spec's fields.
*/}}
{{- define "django-celery-k8s.podSpecCommon" -}}
{{- $root := .root }}
serviceAccountName: {{ .serviceAccountName | default (include "django-celery-k8s.serviceAccountName" $root) }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml (.comp.podSecurityContext | default $root.Values.podSecurityContext) | nindent 2 }}
{{- with (.comp.nodeSelector | default $root.Values.defaults.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.comp.tolerations | default $root.Values.defaults.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.comp.affinity | default $root.Values.defaults.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $selector := .selector | fromYaml }}
{{- with (.comp.topologySpreadConstraints | default $root.Values.defaults.topologySpreadConstraints) }}
topologySpreadConstraints:
  {{- range . }}
  {{- $constraint := deepCopy . }}
  {{- if not (hasKey $constraint "labelSelector") }}
  {{- $_ := set $constraint "labelSelector" (dict "matchLabels" $selector) }}
  {{- end }}
  - {{ toYaml $constraint | nindent 4 | trim }}
  {{- end }}
{{- end }}
{{- end }}

{{/* initContainer that waits for migrations: `manage migrate --check` in a bounded loop. */}}
{{- define "django-celery-k8s.waitForMigrations" -}}
{{- if .Values.migrations.waitInitContainer }}
- name: wait-for-migrations
  image: {{ include "django-celery-k8s.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/sh", "-c"]
  args:
    - |
      deadline=$(( $(date +%s) + {{ .Values.migrations.waitTimeoutSeconds }} ))
      until /app/entrypoint.sh manage migrate --check >/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
          echo "migrations still not applied after {{ .Values.migrations.waitTimeoutSeconds }} s: is the migrate Job failing?" >&2
          exit 1
        fi
        echo "waiting for migrations (manage migrate --check)"
        sleep {{ .Values.migrations.waitIntervalSeconds }}
      done
  envFrom:
    {{- include "django-celery-k8s.envFrom" . | nindent 4 }}
  resources:
    {{- toYaml (.Values.migrations.resources | default .Values.defaults.resources) | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- include "django-celery-k8s.tlsVolumeMounts" . | nindent 4 }}
{{- end }}
{{- end }}

{{/*
A probe from values: dict "probe" <probe values> "prefix" <url prefix>. An httpGet path gets
the prefix (Flower serves everything under FLOWER_URL_PREFIX).
*/}}
{{- define "django-celery-k8s.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if and .prefix $probe.httpGet }}
{{- $_ := set $probe.httpGet "path" (printf "/%s/%s" .prefix ($probe.httpGet.path | trimPrefix "/")) }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
A worker pool's values: the pool's keys merged over worker's; empty blocks then fall back to defaults.
*/}}
{{- define "django-celery-k8s.workerPool" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.worker) (deepCopy .pool)) }}
{{- end }}

{{/* The worker grace period: softShutdownTimeout + longestTaskSeconds + 30 unless set. */}}
{{- define "django-celery-k8s.workerGracePeriod" -}}
{{- if kindIs "invalid" .terminationGracePeriodSeconds }}
{{- add (int .softShutdownTimeout) (int .longestTaskSeconds) 30 }}
{{- else }}
{{- .terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The bundled services' passwords: looked up from the cluster, else generated once. */}}
{{- define "django-celery-k8s.bundledPasswords" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "django-celery-k8s.bundledSecretName" .) }}
{{- $data := dict }}
{{- if $existing }}{{ $data = $existing.data | default dict }}{{ end }}
redis-password: {{ (get $data "redis-password") | default (randAlphaNum 32 | b64enc) }}
postgres-password: {{ (get $data "postgres-password") | default (randAlphaNum 32 | b64enc) }}
{{- end }}

{{/* An httpGet probe of Django sends Host: localhost, which the ConfigMap always allows. */}}
{{- define "django-celery-k8s.hostHeader" -}}
{{- $probe := deepCopy . }}
{{- if and $probe.httpGet (not $probe.httpGet.httpHeaders) }}
{{- $_ := set $probe.httpGet "httpHeaders" (list (dict "name" "Host" "value" "localhost")) }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/* The hook copies of the ConfigMap and Secret, for the pre-install migrate Job. */}}
{{- define "django-celery-k8s.migrateConfigName" -}}
{{- include "django-celery-k8s.componentName" (list . "migrate") }}
{{- end }}

{{- define "django-celery-k8s.migrateHookAnnotations" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: {{ sub (int .Values.migrations.hookWeight) 1 | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}

{{/*
Checkov skips of every workload of the app image, each with its reason. The app reads its
settings from environment variables only (django-environ; Flower reads FLOWER_BASIC_AUTH itself),
so its Secret is passed with envFrom: referenced, never inlined in the manifest.
*/}}
{{- define "django-celery-k8s.checkovSkips" -}}
checkov.io/skip1: CKV_K8S_35=The image reads its settings and secrets from environment variables only (django-environ, Flower); the Secret is referenced by envFrom, never inlined
{{- end }}

{{/*
Name of the migrate Job. A hook is deleted and recreated each time; a plain Job's pod template
is immutable, so its name follows the image: a new image runs a new Job (also under tools that
render with revision 1 every time).
*/}}
{{- define "django-celery-k8s.migrateJobName" -}}
{{- if .Values.migrations.hook }}
{{- include "django-celery-k8s.componentName" (list . "migrate") }}
{{- else }}
{{- printf "%s-migrate-%s" (include "django-celery-k8s.fullname" . | trunc 46 | trimSuffix "-") (include "django-celery-k8s.image" . | sha256sum | trunc 8) }}
{{- end }}
{{- end }}

{{/* A container's security context: the component's own, else the global one. */}}
{{- define "django-celery-k8s.securityContext" -}}
{{- toYaml (.comp.securityContext | default .root.Values.securityContext) }}
{{- end }}

{{/*
TLS to Redis and RabbitMQ (values: tls): the CA bundle and the client certificate, each from an
existing Secret, mounted read-only where the ConfigMap's TLS_CA_FILE, TLS_CERT_FILE and TLS_KEY_FILE
point (django-celery-k8s.tlsEnv). Every container of the app image mounts them: each one loads the
settings, which refuse a TLS file they cannot read.
*/}}
{{- define "django-celery-k8s.tlsCaDir" -}}/etc/tls/ca{{- end }}
{{- define "django-celery-k8s.tlsClientDir" -}}/etc/tls/client{{- end }}

{{- define "django-celery-k8s.tlsEnv" -}}
{{- with .Values.tls }}
{{- if .caSecret }}
TLS_CA_FILE: {{ printf "%s/%s" (include "django-celery-k8s.tlsCaDir" $) .caKey | quote }}
{{- end }}
{{- if .clientCertSecret }}
TLS_CERT_FILE: {{ printf "%s/%s" (include "django-celery-k8s.tlsClientDir" $) .certKey | quote }}
TLS_KEY_FILE: {{ printf "%s/%s" (include "django-celery-k8s.tlsClientDir" $) .keyKey | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "django-celery-k8s.tlsVolumeMounts" -}}
{{- if .Values.tls.caSecret }}
- name: tls-ca
  mountPath: {{ include "django-celery-k8s.tlsCaDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.tls.clientCertSecret }}
- name: tls-client
  mountPath: {{ include "django-celery-k8s.tlsClientDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "django-celery-k8s.tlsVolumes" -}}
{{- with .Values.tls }}
{{- if .caSecret }}
- name: tls-ca
  secret:
    secretName: {{ .caSecret }}
    defaultMode: 0444
    items:
      - key: {{ .caKey }}
        path: {{ .caKey }}
{{- end }}
{{- if .clientCertSecret }}
# Readable by the pod's group (podSecurityContext.fsGroup) only: it holds the private key.
- name: tls-client
  secret:
    secretName: {{ .clientCertSecret }}
    defaultMode: 0440
    items:
      - key: {{ .certKey }}
        path: {{ .certKey }}
      - key: {{ .keyKey }}
        path: {{ .keyKey }}
{{- end }}
{{- end }}
{{- end }}
