"""Event buses: the protocol and the in-process and RabbitMQ implementations."""

from stox.bus.base import Event, EventBus, Handler, PublishError, Rejected, topic_matches

__all__ = ["Event", "EventBus", "Handler", "PublishError", "Rejected", "topic_matches"]
