"""The browser device: one HTML page (``device.html``) that registers a browser as a device over
the device WebSocket and takes calls with the browser's own WebRTC stack. A lower server serves it
at ``GET /device`` (same origin as its device link); nothing here is Python but the path to it."""

from pathlib import Path

#: the page itself
PAGE = Path(__file__).parent / "device.html"
