"""The WebSocket bridge: Autobahn on both legs, whole messages relayed between them."""
