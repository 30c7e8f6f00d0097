"""openpi's websocket policy protocol, served by pi05_jax: `wire` (msgpack-numpy frames) and `server`."""
