"""What the Celery processes and the web report about themselves: Prometheus metrics, beat's
cluster exporter and the probe files of workers and beat."""
