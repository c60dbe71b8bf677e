"""Events sisaflow emits to a Prefect server."""

from __future__ import annotations

from prefect.events import emit_event

DELETION_REQUESTED = "sisaflow.deletion.requested"


def emit_deletion_requested(workspace_name: str, request_id: str) -> str | None:
    """Tell the server a deletion request was recorded; its forget deployment's trigger picks it up.

    Carries the request id only (never owners, records or text). Returns the event id, or None if the event
    could not be sent.
    """
    event = emit_event(
        event=DELETION_REQUESTED,
        resource={"prefect.resource.id": f"sisaflow.workspace.{workspace_name}"},
        payload={"request_id": request_id},
    )
    return str(event.id) if event else None
