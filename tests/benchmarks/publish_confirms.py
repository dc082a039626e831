"""RabbitMQ publisher confirms (CELERY_BROKER_CONFIRM_PUBLISH, on by default): persistent
publishes a second on one connection, with and without confirms, interleaved rounds on a queue
of the benchmark's own (deleted afterwards). Needs RABBITMQ_URL.

    python -m tests.benchmarks.publish_confirms --messages 3000 --rounds 3
"""

import argparse
import os
import time

from tests.benchmarks import harness

QUEUE = "bench-publish-confirms"


def _rate(url: str, confirm: bool, messages: int) -> float:
    from kombu import Connection, Exchange, Producer, Queue

    queue = Queue(QUEUE, Exchange(QUEUE), QUEUE)
    with Connection(url, transport_options={"confirm_publish": confirm}) as connection:
        channel = connection.channel()
        queue(channel).declare()
        producer = Producer(channel)
        started = time.perf_counter()
        for i in range(messages):
            producer.publish({"i": i}, exchange=queue.exchange, routing_key=QUEUE, delivery_mode=2)
        seconds = time.perf_counter() - started
        queue(channel).purge()
    return messages / seconds


def measure(url: str, messages: int, rounds: int) -> dict[bool, list[float]]:
    from kombu import Connection, Queue

    rates: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(rounds):
            for confirm in (False, True):
                rates[confirm].append(_rate(url, confirm, messages))
    finally:
        with Connection(url) as connection:
            Queue(QUEUE)(connection.channel()).delete()
    return rates


def report(rates: dict[bool, list[float]], messages: int, rounds: int) -> list[str]:
    plain, confirmed = harness.median(rates[False]), harness.median(rates[True])
    return [
        f"RabbitMQ publisher confirms: {messages} persistent publishes on one connection; median of {rounds}",
        f"  without confirms: {plain:.0f}/s   runs: {', '.join(f'{r:.0f}' for r in rates[False])}",
        f"  with confirms:    {confirmed:.0f}/s   runs: {', '.join(f'{r:.0f}' for r in rates[True])}",
        f"  with / without: {confirmed / plain:.2f}x ({1000 / confirmed - 1000 / plain:.2f} ms more per publish)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rates = measure(os.environ["RABBITMQ_URL"], args.messages, args.rounds)
    print("\n".join(report(rates, args.messages, args.rounds)))


if __name__ == "__main__":
    main()
