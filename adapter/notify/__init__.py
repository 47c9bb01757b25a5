"""Notifications (issue 26): triggers the task modules declare, an outbox, and two sinks.

- `triggers.py`: what a trigger is (tasks declare theirs on their `Task`) and the event it makes;
- `notifier.py`: the pipeline's one entry: facts of a record read with the caller's token, a
  fresh answer evaluated against them, a finished batch; events written to the outbox;
- `outbox.py`: the outbox (a Redis Stream read with a consumer group; retries and dead letters);
- `sinks.py`: the CRM's own `notifications` collection (MongoDB) and Standard Webhooks;
- `worker.py`: the delivery worker every replica runs.
"""
