"""The admin and the API docs in a real browser, as a new user meets them after `make run`: a
gunicorn web (DEBUG, as `make run` serves it) and a real worker; a task started with Swagger UI's
"Try it out", watched in the admin's task history, re-run and revoked from there. No page may
log a console error or load anything that fails, and each page's icon loads."""

import json
import uuid

import pytest
from django.db import connections

from app.models import TaskLog, TaskState
from tests.browser import launch_chromium, needs_chromium
from tests.conftest import http, make_api_token, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True), needs_chromium]

PASSWORD = "a long enough secret 1"
# The width the task history list was cut at (Duration hidden).
VIEWPORT = {"width": 1400, "height": 900}
SUCCESS_GREEN = "rgb(46, 125, 50)"  # .badge-success in app/static/app/admin.css

# The page's linked icon, decoded as an image: its width, or 0 when it is missing or no image.
ICON_WIDTH = """async () => {
    const link = document.querySelector("link[rel=icon]");
    if (!link) return 0;
    const image = new Image();
    image.src = link.href;
    try { await image.decode(); } catch (error) { return 0; }
    return image.naturalWidth;
}"""


@pytest.fixture
def page(monkeypatch):
    """A chromium page, 1,400 px wide, and what went wrong on it (`page.problems`): console
    errors, script errors, answers of 400 and above, requests that failed."""
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread: Django refuses queries under it
    # unless told (Playwright's advice for Django tests; none runs concurrently), and gives them a
    # connection of their own, closed here so that the test database can be dropped.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(15_000)
            page.problems = problems = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("requestfailed", lambda r: problems.append(f"failed {r.url}: {r.failure}"))
            yield page
        finally:
            browser.close()
            connections.close_all()


def history_row(task_id: str, state: str, timeout: float = 20) -> TaskLog:
    """The task's TaskLog row once the history recorder has written it in `state`."""
    rows = TaskLog.objects.filter(task_id=task_id, state=state)
    return wait_until(rows.first, timeout=timeout, message=f"{task_id} in the history as {state}")


@pytest.mark.timeout(60)
def test_a_new_user_runs_a_task_from_the_api_docs_and_steers_it_from_the_admin(
    start_web, redis_worker, task_history, django_user_model, page
):
    django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    token = make_api_token()
    web = start_web(DJANGO_DEBUG="true")
    # A failed run in the history, for the re-run action (the API has no quick way to fail one).
    failed = TaskLog.objects.create(
        task_id=str(uuid.uuid4()), task_name="app.tasks.add", args=[20, 22], kwargs={}, state=TaskState.FAILURE
    )

    def visit(path: str, ready: str) -> None:
        page.goto(web + path)
        page.wait_for_selector(ready, state="attached")
        assert page.evaluate(ICON_WIDTH) > 0, f"{path}: no icon"

    def task_history_row(task_id: str):
        visit(f"/admin/app/tasklog/?q={task_id[:8]}", "#result_list")
        return page.locator("#result_list tbody tr", has=page.locator(f"code[title='{task_id}']"))

    def run_action(task_id: str, action: str) -> None:
        task_history_row(task_id).locator("input.action-select").check()
        page.select_option("select[name=action]", action)
        page.click("button[name=index]")
        page.wait_for_selector(".messagelist .success")

    # The API docs: authorize with the token, then "Try it out" with the example body.
    visit("/api/docs", ".opblock")
    page.click("button.authorize")
    page.fill(".modal-ux input", token)
    page.click(".modal-ux button.authorize")
    page.click(".modal-ux button.btn-done")
    operation = page.locator(".opblock-post", has=page.locator("[data-path='/api/simple-task/']"))
    operation.locator(".opblock-summary").click()
    operation.locator("button.try-out__btn").click()
    body = operation.locator("textarea.body-param__text").input_value()
    assert json.loads(body) == {"x": 2, "y": 3, "operation": "add"}
    operation.locator("button.execute").click()
    answer = operation.locator(".live-responses-table tbody tr.response")
    answer.wait_for()
    assert answer.locator(".response-col_status").inner_text().strip() == "202"
    task_id = json.loads(answer.locator(".response-col_description pre").first.inner_text())["task_id"]
    assert history_row(task_id, TaskState.SUCCESS).result == 5

    # The admin: log in, find the task in the history with its green badge, every column in view.
    visit("/admin/login/", "#id_username")
    page.fill("#id_username", "root")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"{web}/admin/")
    badge = task_history_row(task_id).locator(".badge")
    assert badge.inner_text() == "SUCCESS"
    assert badge.evaluate("badge => getComputedStyle(badge).backgroundColor") == SUCCESS_GREEN
    assert page.evaluate(
        "() => document.querySelector('#result_list').scrollWidth"
        " <= document.querySelector('#changelist .results').clientWidth"
    ), "the task history list is wider than its place at 1,400 px"
    visit(f"/admin/app/tasklog/{history_row(task_id, TaskState.SUCCESS).pk}/change/", ".badge")

    # Re-run: the failed call is sent again under a new id, and runs.
    run_action(failed.task_id, "rerun_failed")
    rerun = wait_until(
        lambda: TaskLog.objects.filter(args=[20, 22], state=TaskState.SUCCESS).exclude(pk=failed.pk).first(),
        timeout=20,
        message="the re-run's success in the history",
    )
    assert rerun.result == 42
    assert task_history_row(rerun.task_id).locator(".badge").inner_text() == "SUCCESS"

    # Revoke: a long task, stopped while it runs.
    status, answer_body = http(
        "POST",
        f"{web}/api/long-task/",
        json.dumps({"total_steps": 30, "step_seconds": 1}).encode(),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert status == 202, answer_body
    long_task_id = json.loads(answer_body)["task_id"]
    history_row(long_task_id, TaskState.STARTED)
    run_action(long_task_id, "revoke_running")
    history_row(long_task_id, TaskState.REVOKED)
    assert task_history_row(long_task_id).locator(".badge").inner_text() == "REVOKED"

    # For a page that links no icon (a JSON answer), browsers ask /favicon.ico.
    icon = page.goto(f"{web}/favicon.ico")
    assert icon.headers["content-type"] in ("image/x-icon", "image/vnd.microsoft.icon")

    assert page.problems == []
