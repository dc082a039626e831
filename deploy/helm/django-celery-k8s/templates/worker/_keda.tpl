{{/*
What KEDA reads for a worker pool: dict "root" $ "pool" <the pool's merged values>.
The backlog is what the pool must hold at once: the tasks waiting in its queues and those its
workers have taken (reserved or running). README, "Autoscaling on the backlog".
*/}}

{{/* The trigger type: keda.trigger, else rabbitmq for an amqp broker URL, else prometheus. */}}
{{- define "django-celery-k8s.kedaTrigger" -}}
{{- $trigger := .pool.keda.trigger }}
{{- if not $trigger }}
{{- $scheme := (urlParse (.root.Values.secrets.brokerUrl | default "redis://")).scheme }}
{{- $trigger = ternary "rabbitmq" "prometheus" (has $scheme (list "amqp" "amqps" "pyamqp")) }}
{{- end }}
{{- $trigger }}
{{- end }}

{{/*
The pool's backlog in PromQL, from the project's own metrics:
- celery_queue_length{queue_name}: beat's count of each queue (on Redis the sum of its priority
  lists, app/monitoring/cluster_metrics.py); max by queue, so a second scrape of it never counts twice;
- celery_worker_tasks_active{hostname}: tasks running in a worker, named <pool>@<pod> by the
  chart (CELERY_WORKER_NAME). On Redis a worker takes a message only when a process is free
  (CELERY_WORKER_DISABLE_PREFETCH), so the tasks it holds are the ones it runs.
No queue length (beat or its scrape is down) is no answer, not 0: KEDA keeps the pool as it is.
No worker series (a pool at zero pods) means nothing runs: 0.
*/}}
{{- define "django-celery-k8s.kedaBacklogQuery" -}}
{{- $namespace := printf "namespace=%q" .root.Release.Namespace }}
{{- $queues := list }}
{{- range .pool.queues }}{{ $queues = append $queues (regexQuoteMeta .) }}{{ end }}
{{- $waiting := printf "%s, job=%q, queue_name=~%q" $namespace .root.Values.metrics.podMonitor.beat.job (join "|" $queues) }}
{{- $running := printf "%s, job=%q, hostname=~%q" $namespace .root.Values.metrics.podMonitor.worker.job (printf "%s@.+" .pool.name) }}
{{- printf "sum(max by (queue_name) (celery_queue_length{%s})) + (sum(celery_worker_tasks_active{%s}) or vector(0))" $waiting $running }}
{{- end }}

{{/*
RabbitMQ's management API address, without credentials: keda.rabbitmq.managementUrl, else the
broker URL's host and vhost on the management port (15672, or 15671 with TLS).
*/}}
{{- define "django-celery-k8s.kedaRabbitmqUrl" -}}
{{- $url := .pool.keda.rabbitmq.managementUrl }}
{{- if and (not $url) .root.Values.secrets.brokerUrl }}
{{- $broker := urlParse .root.Values.secrets.brokerUrl }}
{{- $tls := eq $broker.scheme "amqps" }}
{{- $url = printf "%s://%s:%d%s" (ternary "https" "http" $tls) $broker.hostname (ternary 15671 15672 $tls) (ternary $broker.path "/" (ne $broker.path "")) }}
{{- end }}
{{- required (printf "workerPools %s: keda.rabbitmq.managementUrl is required when secrets.brokerUrl does not give RabbitMQ's host" .pool.name) $url }}
{{- end }}
