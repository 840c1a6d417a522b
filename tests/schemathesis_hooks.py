"""Schemathesis hooks for tests/test_e2e_openapi.py (SCHEMATHESIS_HOOKS): WHIP and WHEP bodies
are SDP text (``application/sdp``, ``application/trickle-ice-sdpfrag``), sent as text/plain's
are."""

import schemathesis

schemathesis.serializer.alias(["application/sdp", "application/trickle-ice-sdpfrag"],
                              "text/plain")
