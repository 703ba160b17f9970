"""CURVE setup, the bind policy, and the handshake monitor."""
