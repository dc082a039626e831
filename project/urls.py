"""Top-level URLs: the JSON API under /api/, the admin, and the site's icon at /favicon.ico."""

from django.contrib import admin
from django.shortcuts import redirect
from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView

from app.api import api

# The admin modules of every app, loaded by the web only (settings: SimpleAdminConfig).
admin.autodiscover()


def favicon(request):
    """Where browsers look for an icon on a page that links none (a JSON answer, an error page)."""
    return redirect(static("favicon.ico"))


urlpatterns = [
    path("", RedirectView.as_view(url="/api/docs", permanent=False)),
    path("favicon.ico", favicon),
    path("admin/", admin.site.urls),
    # The docs' address with a slash too (every other page of the API ends with one).
    path("api/docs/", RedirectView.as_view(pattern_name="api:openapi-view", permanent=True)),
    path("api/", api.urls),
]
