"""The coordinator's security: the bind policy (bind.py), CURVE server keys and the ZAP authenticator
(curve.py), and refused connections in the log (refusals.py). The client's keys are client/keys.py."""
