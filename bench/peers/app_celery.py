import os

from celery import Celery

from marks import mark_latency, mark_now, run_true

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_ignore_result=True,          # no result backend round trip
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task
def noop():
    mark_now()


@app.task
def shell():
    run_true()


@app.task
def stamp(enqueued):
    mark_latency(enqueued)
