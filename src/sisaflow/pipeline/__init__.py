"""The run: the step functions and the one table of them (`steps`), their order with locking and every decision
about a request's state (`sequence`), the typed run report and the cost model (`report`), a workspace's status
(`status`), creating a workspace (`create`), and `verify --exact` (`exactness`). Imports: every package below
it; never `flows` or `cli`."""
