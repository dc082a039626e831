"""A task's queue (app/routing.py): the one a call is sent to, and the one a received task came
from, whatever delay RabbitMQ's delayed delivery put in front of its routing key."""

from types import SimpleNamespace

from django.conf import settings
from kombu import Queue

from app import routing, tasks
from project.celery import app as celery_app


def test_a_routed_task_goes_to_its_routes_queue_and_any_other_to_the_default_queue():
    assert routing.routed_queue(tasks.long_running_task.name) == settings.CELERY_LONG_QUEUE
    assert routing.routed_queue(tasks.add.name, app=celery_app) == settings.CELERY_TASK_DEFAULT_QUEUE
    assert routing.routed_queue("not.a.registered.task") == settings.CELERY_TASK_DEFAULT_QUEUE


def test_a_calls_own_queue_wins_over_the_route():
    assert routing.routed_queue(tasks.long_running_task.name, {"queue": "elsewhere"}) == "elsewhere"
    assert routing.routed_queue(tasks.add.name, {"queue": Queue("a-queue-object")}) == "a-queue-object"
    assert routing.routed_queue(tasks.add.name, {"time_limit": 5}) == settings.CELERY_TASK_DEFAULT_QUEUE


def test_a_received_task_names_its_queue_without_the_delay_in_front_of_its_routing_key():
    delayed = "0." * 27 + "1.default"  # 28 binary digits of delay, then the queue

    assert routing.queue_of(SimpleNamespace(delivery_info={"routing_key": "long"})) == "long"
    assert routing.queue_of(SimpleNamespace(delivery_info={"routing_key": delayed})) == "default"
    assert routing.queue_of(SimpleNamespace(delivery_info={"routing_key": "0-not-a-delay"})) == "0-not-a-delay"


def test_a_task_with_no_routing_key_has_no_queue():
    assert routing.queue_of(SimpleNamespace(delivery_info=None)) == ""
    assert routing.queue_of(SimpleNamespace(delivery_info={"is_eager": True})) == ""
    assert routing.queue_of(None) == ""
