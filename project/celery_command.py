"""`celery worker` and `celery beat` for the project's app, without the `celery` command group.

The group imports every installed plugin command before it reads an argument (Flower's, with
its web server) and click-repl for `celery amqp`: measured, 0.09 s of a worker's 0.9 s start and
memory in every worker and beat process. Each subcommand here is Celery's own click command,
so every option of `celery -A project worker` / `beat` works the same:

    python -m project.celery_command [--quiet] [--no-color] worker|beat [OPTIONS...]
"""

import sys

GLOBAL_FLAGS = {"-q": "quiet", "--quiet": "quiet", "-C": "no_color", "--no-color": "no_color"}
USAGE = "usage: python -m project.celery_command [--quiet] [--no-color] worker|beat [OPTIONS...]"


def main(argv: list[str]) -> None:
    flags = {"quiet": False, "no_color": False}
    while argv and argv[0] in GLOBAL_FLAGS:
        flags[GLOBAL_FLAGS[argv.pop(0)]] = True
    if not argv or argv[0] not in ("worker", "beat"):
        sys.exit(USAGE)
    name, options = argv[0], argv[1:]
    from celery.bin.base import CLIContext

    if name == "worker":
        from celery.bin.worker import worker as command
    else:
        from celery.bin.beat import beat as command
    from project.celery import app

    context = CLIContext(app=app, no_color=flags["no_color"], workdir=None, quiet=flags["quiet"])
    command.main(args=options, obj=context, prog_name=f"celery {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
