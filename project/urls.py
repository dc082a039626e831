"""Top-level URLs: the JSON API under /api/ and the admin."""

from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from app.api import api

# The admin modules of every app, loaded by the web only (settings: SimpleAdminConfig).
admin.autodiscover()

urlpatterns = [
    path("", RedirectView.as_view(url="/api/docs", permanent=False)),
    path("admin/", admin.site.urls),
    # The docs' address with a slash too (every other page of the API ends with one).
    path("api/docs/", RedirectView.as_view(pattern_name="api:openapi-view", permanent=True)),
    path("api/", api.urls),
]
