"""The project's URLs plus /bench/empty/, an empty JSON view (tests/benchmarks/api_throughput.py)."""

from django.http import JsonResponse
from django.urls import path

from project.urls import urlpatterns as project_urlpatterns


def empty(request):
    return JsonResponse({})


urlpatterns = [path("bench/empty/", empty), *project_urlpatterns]
