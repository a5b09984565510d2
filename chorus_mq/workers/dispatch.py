"""Sending work to the fleet by task name, or running it in this process when the settings say eager.

Only workers, beat and operators send tasks; every argument is data the sender produced or
checked. A client's record never becomes a task name, a queue, a callback or an option.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from ..names import TASK_QUEUES, Task


class Dispatcher:
    """Enqueue ``Task``s on their queues (or apply them in-process when ``eager``)."""

    def __init__(self, app: Celery, *, eager: bool = False):
        self.app = app
        self.eager = eager

    def send(self, task: Task, *args: Any) -> None:
        if self.eager:
            self.app.tasks[task.value].apply(args=list(args), throw=True)
            return
        # no callbacks, links or options: the message is a task name, its queue and plain arguments
        self.app.send_task(task.value, args=list(args), queue=TASK_QUEUES[task].value)
