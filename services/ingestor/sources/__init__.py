"""Where fills come from. Each source turns a provider's protocol into `OrderFill`s handed to the
publisher; the publisher's dedupe makes overlapping sources (WebSocket, REST backfill) safe."""
