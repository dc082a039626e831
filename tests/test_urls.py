"""Top-level URLs: the site's icon, linked from the admin and the API docs and at /favicon.ico."""

import re

import pytest
from django.contrib.staticfiles import finders
from django.templatetags.static import static

pytestmark = pytest.mark.django_db


def linked_icons(html: bytes) -> list[str]:
    return re.findall(r'<link rel="icon" href="([^"]+)"', html.decode())


def test_favicon_ico_redirects_to_the_icon_in_the_static_files(client):
    response = client.get("/favicon.ico")

    assert response.status_code == 302
    assert response.headers["Location"] == static("favicon.ico")
    with open(finders.find("favicon.ico"), "rb") as icon:
        assert icon.read(4) == b"\x00\x00\x01\x00"  # an ICO file's header


def test_the_admin_pages_and_the_api_docs_link_the_icon_and_no_other(client, admin_user):
    assert linked_icons(client.get("/admin/login/").content) == [static("favicon.ico")]
    client.force_login(admin_user)
    for path in ("/admin/", "/admin/app/tasklog/", "/admin/app/scheduledtask/add/"):
        assert linked_icons(client.get(path).content) == [static("favicon.ico")], path
    # django-ninja's own icons replaced, not added to.
    assert linked_icons(client.get("/api/docs").content) == [static("favicon.ico")]
