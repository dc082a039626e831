{{/*
OpenTelemetry traces (project/tracing.py reads the standard OTEL_* variables). The collector's
address and the sampler are settings of the whole release (the ConfigMap); each traced role
(web, every worker pool, beat) says who it is with the env below: dict "root" $ "service"
<role suffix> "deployment" <its Deployment's name>.
*/}}
{{- define "django-celery-k8s.tracingEnv" -}}
{{- $t := .root.Values.tracing }}
{{- if $t.enabled }}
{{- $attributes := dict "k8s.deployment.name" .deployment "service.version" (.root.Values.image.tag | default .root.Chart.AppVersion) }}
{{- $pairs := list "k8s.namespace.name=$(OTEL_K8S_NAMESPACE)" "k8s.pod.name=$(OTEL_K8S_POD_NAME)" }}
{{- range $key := keys $attributes | sortAlpha }}{{ $pairs = append $pairs (printf "%s=%s" $key (index $attributes $key)) }}{{ end }}
{{- range $key := keys $t.resourceAttributes | sortAlpha }}{{ $pairs = append $pairs (printf "%s=%s" $key (index $t.resourceAttributes $key | toString)) }}{{ end }}
# Resource attributes of this role's spans; the two below are expanded into them by the kubelet.
- name: OTEL_K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OTEL_K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: OTEL_SERVICE_NAME
  value: {{ printf "%s-%s" $t.serviceNamePrefix .service | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $pairs | quote }}
{{- end }}
{{- end }}

{{/* The collector's port, for the NetworkPolicy: the endpoint's, else its scheme's. */}}
{{- define "django-celery-k8s.tracingPort" -}}
{{- $url := urlParse .Values.tracing.endpoint }}
{{- $hostPort := splitList ":" $url.host }}
{{- if gt (len $hostPort) 1 }}{{ last $hostPort }}{{ else }}{{ ternary 443 80 (eq $url.scheme "https") }}{{ end }}
{{- end }}
